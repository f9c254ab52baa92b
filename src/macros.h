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
// of a * b + c where its bits must not depend on the clone, and marks the body its clones share
// always_inline, so each clone holds a copy compiled for its level (left to g++, reduce_list's
// clones tail-called one copy built for the baseline in some files). Only levels above the build's
// baseline are cloned: built for x86-64-v3 or v4 already (CFLAGS=-march=native, say), the lower
// clones could never run, and g++ 12 stops with an internal compiler error on an x86-64-v3 clone
// of rnc_loss' exp under an AVX-512 baseline.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__) && !defined(__CUDACC__)
#define DIRFAST_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#else
#define DIRFAST_TARGET_CLONES(...)
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512CD__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__)
#define DIRFAST_BASELINE_LEVEL 4
#elif defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__) && defined(__F16C__)
#define DIRFAST_BASELINE_LEVEL 3
#else
#define DIRFAST_BASELINE_LEVEL 1
#endif
#ifndef DIRFAST_V3_CLONES
#if DIRFAST_BASELINE_LEVEL < 3
#define DIRFAST_V3_CLONES DIRFAST_TARGET_CLONES("arch=x86-64-v3", "default")
#else
#define DIRFAST_V3_CLONES
#endif
#endif
#ifndef DIRFAST_V4_CLONES
#if DIRFAST_BASELINE_LEVEL < 3
#define DIRFAST_V4_CLONES DIRFAST_TARGET_CLONES("arch=x86-64-v4", "arch=x86-64-v3", "default")
#elif DIRFAST_BASELINE_LEVEL < 4
#define DIRFAST_V4_CLONES DIRFAST_TARGET_CLONES("arch=x86-64-v4", "default")
#else
#define DIRFAST_V4_CLONES
#endif
#endif
