// What the CUDA kernels (csrc/cuda/*.cu) share: element conversions and aligned vectors on the
// device (cuda_fp16 / cuda_bf16 types stand for c10::Half / c10::BFloat16: the same bits), and on
// the host the dtype dispatch, the current stream, the device guard, the SM count and the
// launch check, all through torch's stable ABI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "dirfast.h"
#include "layout.h"

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

// ------------------------------------------------------------------------------ host side
// body(T()) with T the CUDA type of a floating dtype.
template <typename Body>
void dispatch_cuda_float(ScalarType t, const char* op, Body&& body) {
  switch (t) {
    case ScalarType::Float: body(float()); return;
    case ScalarType::Double: body(double()); return;
    case ScalarType::Half: body(__half()); return;
    case ScalarType::BFloat16: body(__nv_bfloat16()); return;
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(t));
  }
}

// The stream torch launches on for the device of t (the current stream: CUDA graphs capture it).
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Makes the device of t current for the enclosing scope (the kernels launch on it).
inline torch::stable::accelerator::DeviceGuard device_guard(const Tensor& t) {
  return torch::stable::accelerator::DeviceGuard(t.get_device_index());
}

// Streaming multiprocessors of the device of t, asked once per device.
inline int sm_count(const Tensor& t) {
  static std::mutex mutex;
  static std::vector<int> counts;
  const int index = t.get_device_index();
  std::lock_guard<std::mutex> lock(mutex);
  if (index >= static_cast<int>(counts.size())) counts.resize(index + 1, 0);
  if (counts[index] == 0) {
    int value = 0;
    cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, index);
    counts[index] = value > 0 ? value : 1;
  }
  return counts[index];
}

// The status of the kernels just enqueued (launch errors only: nothing waits for the GPU).
inline void check_launch(const char* op) {
  const cudaError_t status = cudaGetLastError();
  STD_TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

// A feature tensor as the kernels address it, from its csrc/layout.h Layout: row r (a sample of
// [N, D], or a pixel of [P, C, *spatial]) is p = r / inner, s = r % inner, and its feature f sits
// at  p * stride_p + s * stride_s + f * stride_f  (elements). stride_f == 1 for the rows layout,
// stride_s == 1 for the planar one.
struct Features {
  const void* data;
  int64_t rows, inner, dim, stride_p, stride_s, stride_f;
};

inline Features features(const Tensor& x, const Layout& layout) {
  if (layout.kind == Layout::kRows) {
    return Features{x.const_data_ptr(), layout.rows, layout.rows, layout.dim, 0, layout.row_stride, 1};
  }
  return Features{x.const_data_ptr(), layout.rows, layout.inner, layout.dim, layout.batch_stride, 1,
                  layout.feature_stride};
}

// Where an op writes features shaped like its input, addressed as Features are.
struct Output {
  void* data;
  int64_t stride_p, stride_s, stride_f;
};

inline Output output(const Tensor& y, const Layout& layout) {
  const Features f = features(y, layout);
  return Output{y.mutable_data_ptr(), f.stride_p, f.stride_s, f.stride_f};
}

}  // namespace cuda
}  // namespace dirfast
