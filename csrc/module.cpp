// The Python module dirfast._C: importing it runs the STABLE_TORCH_LIBRARY_IMPL registrations of
// the CPU kernels (csrc/cpu/*.cpp) for the dirfast:: ops, whose schemas dirfast/ops defines, and
// gives Python the kernels' thread limit (csrc/parallel.h: kernel_threads, set_free_cores_only).
// It uses only Python's limited API, so one build serves every CPython from 3.10 (abi3).
#include <Python.h>

#include "parallel.h"

namespace {

PyObject* set_free_cores_only(PyObject*, PyObject* on) {
  const int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  return PyBool_FromLong(dirfast::set_free_cores_only(value != 0));
}

PyObject* kernel_threads(PyObject*, PyObject*) { return PyLong_FromLongLong(dirfast::kernel_threads()); }

PyMethodDef methods[] = {
    {"set_free_cores_only", set_free_cores_only, METH_O,
     "Limit the CPU kernels to the cores other processes leave free (True) or not; returns the previous setting."},
    {"kernel_threads", kernel_threads, METH_NOARGS, "The threads a CPU kernel called now would run on."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dirfast's CPU kernels", -1, methods};
  return PyModule_Create(&module);
}
