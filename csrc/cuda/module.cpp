// The Python module dirfast._C_cuda: importing it runs the STABLE_TORCH_LIBRARY_IMPL registrations of
// the CUDA kernels (csrc/cuda/*.cu) for the dirfast:: ops, whose schemas dirfast/ops defines.
// It uses only Python's limited API, so one build serves every CPython from 3.10 (abi3).
#include <Python.h>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "dirfast's CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}
