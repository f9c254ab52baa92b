// The dirfast:: op schemas, registered once with TORCH_LIBRARY, and the module that loads them.
//
// The schema strings are generated at build time from dirfast/_schema.py (setup.py writes
// dirfast_schemas.h), so Python (which defines the same schemas when this extension is absent)
// and C++ can never disagree. Kernels register themselves for their dispatch key in their
// own files (csrc/cpu/*.cpp, csrc/cuda/*.cpp) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "dirfast_schemas.h"

TORCH_LIBRARY(dirfast, m) {
  for (const char* schema : dirfast::kSchemas) {
    m.def(schema);
  }
}

#ifndef DIRFAST_WITH_CUDA
#define DIRFAST_WITH_CUDA 0
#endif

// A plain module, as in pytorch/extension-cpp: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dirfast compiled ops", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddObject(module, "cuda_compiled", PyBool_FromLong(DIRFAST_WITH_CUDA));
  }
  return module;
}
