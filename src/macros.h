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

// Hot loops compiled once per instruction set, the clone chosen when the library loads (g++ on
// x86-64 Linux; elsewhere one build): DIRFAST_V3_CLONES for x86-64-v3 (AVX2, FMA) and the
// baseline; DIRFAST_V4_CLONES adds x86-64-v4 (AVX-512), for the loops measured faster with it
// (benchmarks/results/cpu/avx512-clones.md). A kernel that uses them turns off the contraction
// of a * b + c where its bits must not depend on the clone.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__) && !defined(__CUDACC__)
#define DIRFAST_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#else
#define DIRFAST_TARGET_CLONES(...)
#endif
#ifndef DIRFAST_V3_CLONES
#define DIRFAST_V3_CLONES DIRFAST_TARGET_CLONES("arch=x86-64-v3", "default")
#endif
#ifndef DIRFAST_V4_CLONES
#define DIRFAST_V4_CLONES DIRFAST_TARGET_CLONES("arch=x86-64-v4", "arch=x86-64-v3", "default")
#endif
