// The Python module dirfast._C: importing it runs the STABLE_TORCH_LIBRARY_IMPL registrations of
// the CPU kernels (csrc/cpu/*.cpp) for the dirfast:: ops, whose schemas dirfast/ops defines, and
// gives Python the kernels' thread limit (csrc/parallel.h: kernel_threads, set_free_cores_only) and,
// for tests (csrc/test_hooks.h), the reading behind it (read_busy_cpus) of a /proc/stat under a root
// of their own and mixture_logpdf's forward at a chosen vector width.
// It uses only Python's limited API, so one build serves every CPython from 3.10 (abi3).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string>

#include "parallel.h"
#include "test_hooks.h"

namespace {

PyObject* set_free_cores_only(PyObject*, PyObject* on) {
  const int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  return PyBool_FromLong(dirfast::set_free_cores_only(value != 0));
}

PyObject* kernel_threads(PyObject*, PyObject*) { return PyLong_FromLongLong(dirfast::kernel_threads()); }

PyObject* read_busy_cpus(PyObject*, PyObject* root) {
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(root, &size);
  if (text == nullptr) return nullptr;
  double busy_s = 0.0;
  int64_t cpus = 0;
  if (!dirfast::read_busy_cpus(std::string(text, static_cast<size_t>(size)), &busy_s, &cpus)) Py_RETURN_NONE;
  return Py_BuildValue("(dL)", busy_s, static_cast<long long>(cpus));
}

// (x, means, variances, log_weights, lanes, grads): float32 values as bytes in, out as bytes (with
// grads, out, gx and gv one after another); None where this machine has no code of that width.
PyObject* mixture_logpdf_lanes(PyObject*, PyObject* args) {
  const char *x, *means, *variances, *log_weights;
  Py_ssize_t nx, nm, nv, nw;
  int lanes, grads;
  if (!PyArg_ParseTuple(args, "y#y#y#y#ip", &x, &nx, &means, &nm, &variances, &nv, &log_weights, &nw, &lanes,
                        &grads)) {
    return nullptr;
  }
  if (nx % 4 != 0 || nm % 4 != 0 || nv != nm || nw != nm) {
    PyErr_SetString(PyExc_ValueError, "float32 bytes expected, the three tables of one length");
    return nullptr;
  }
  std::string out(static_cast<size_t>(grads ? 3 * nx : nx), '\0');
  const auto f = [](const char* p) { return reinterpret_cast<const float*>(p); };
  float* o = reinterpret_cast<float*>(out.data());
  if (!dirfast::cpu::mixture_logpdf_lanes(f(x), nx / 4, f(means), f(variances), f(log_weights), nm / 4, lanes, o,
                                          grads ? o + nx / 4 : nullptr, grads ? o + nx / 2 : nullptr)) {
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

PyMethodDef methods[] = {
    {"set_free_cores_only", set_free_cores_only, METH_O,
     "Limit the CPU kernels to the cores other processes leave free (True) or not; returns the previous setting."},
    {"kernel_threads", kernel_threads, METH_NOARGS, "The threads a CPU kernel called now would run on."},
    {"_read_busy_cpus", read_busy_cpus, METH_O,
     "(busy seconds, CPUs) of this process's CPUs in <root>/proc/stat, or None ('' reads this machine's)."},
    {"_mixture_logpdf_lanes", mixture_logpdf_lanes, METH_VARARGS,
     "mixture_logpdf's float32 forward of x (bytes; with grads, and its gradients) by the code of <lanes> float "
     "lanes, or None without it."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dirfast's CPU kernels", -1, methods};
  return PyModule_Create(&module);
}
