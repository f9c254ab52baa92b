// Portability macros of the torch-free core: the same header compiles with g++ (CPU kernels)
// and nvcc (CUDA kernels).
#pragma once

#ifndef DIRFAST_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIRFAST_HOST_DEVICE __host__ __device__
#else
#define DIRFAST_HOST_DEVICE
#endif
#endif

#ifndef DIRFAST_RESTRICT
#if defined(_MSC_VER) && !defined(__CUDACC__)
#define DIRFAST_RESTRICT __restrict
#else
#define DIRFAST_RESTRICT __restrict__
#endif
#endif

// Keeps a hot loop in a function of its own: inlined into a large caller it can be scheduled worse.
#ifndef DIRFAST_NOINLINE
#if defined(_MSC_VER) && !defined(__CUDACC__)
#define DIRFAST_NOINLINE __declspec(noinline)
#else
#define DIRFAST_NOINLINE __attribute__((noinline))
#endif
#endif
