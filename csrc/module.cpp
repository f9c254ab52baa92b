// The Python module dirfast._C: importing it runs the STABLE_TORCH_LIBRARY_IMPL registrations of
// the CPU kernels (csrc/cpu/*.cpp) for the dirfast:: ops, whose schemas dirfast/ops defines.
// It uses only Python's limited API, so one build serves every CPython from 3.10 (abi3).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dirfast's CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
