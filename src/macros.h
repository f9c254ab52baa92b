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

// A hot loop compiled twice, for x86-64-v3 (AVX2, FMA) and for the baseline, the clone chosen when
// the library loads (g++ on x86-64 Linux; elsewhere one build). A kernel that uses it turns off the
// contraction of a * b + c where its bits must not depend on the clone.
#ifndef DIRFAST_V3_CLONES
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__) && !defined(__CUDACC__)
#define DIRFAST_V3_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DIRFAST_V3_CLONES
#endif
#endif
