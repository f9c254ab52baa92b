// Device helpers shared by the CUDA kernels (src/*.cu): element conversions, aligned vectors,
// dtype dispatch and launch checks. Torch-free: cuda_fp16 / cuda_bf16 types stand for
// c10::Half / c10::BFloat16 (same bits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dirfast_cuda.h"

namespace dirfast {
namespace cuda {

// ------------------------------------------------------------------------------ conversions
// To the accumulation type (exact for every input type).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) { return static_cast<acc_t>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ double to_acc<double, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ double to_acc<double, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Back to the storage type, rounding to nearest even. A double goes through float first, as
// c10::Half(double) and c10::BFloat16(double) do, so the bits match the CPU kernels and torch.
template <typename T>
__device__ __forceinline__ T from_acc(float v) { return static_cast<T>(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }

// ------------------------------------------------------------------------------ vectors
// N elements loaded or stored with one (or, past 16 bytes, a few) wide memory instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Whether p is aligned for Vec<T, N> and every offset that is a multiple of `step` elements
// keeps it so.
template <typename T, int N>
inline bool vec_aligned(const void* p, int64_t step) {
  constexpr int64_t bytes = sizeof(T) * N >= 16 ? 16 : sizeof(T) * N;
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (step * int64_t(sizeof(T))) % bytes == 0;
}

// The bucket of a row: its index when in [0, num_bins), else `outside`.
template <typename index_t>
__device__ __forceinline__ int64_t bucket_of(const index_t* idx, int64_t r, int64_t num_bins,
                                             int64_t outside) {
  const int64_t k = static_cast<int64_t>(idx[r]);
  return (k >= 0 && k < num_bins) ? k : outside;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ dispatch
// Calls body(T()) with T the element type of a DirfastDtype (error: cudaErrorInvalidValue).
template <typename Body>
cudaError_t dispatch_dtype(int dtype, Body body) {
  switch (dtype) {
    case DIRFAST_FLOAT32: return body(float());
    case DIRFAST_FLOAT64: return body(double());
    case DIRFAST_FLOAT16: return body(__half());
    case DIRFAST_BFLOAT16: return body(__nv_bfloat16());
    default: return cudaErrorInvalidValue;
  }
}

template <typename Body>
cudaError_t dispatch_index(int is_int64, Body body) {
  return is_int64 ? body(int64_t()) : body(int32_t());
}

// The status of the kernels just enqueued (launch errors only: nothing waits for the GPU).
inline cudaError_t launched() { return cudaGetLastError(); }

}  // namespace cuda
}  // namespace dirfast
