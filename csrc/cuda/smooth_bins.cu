// dirfast::smooth_bins on CUDA: every column of a [B, columns] table smoothed along the bins,
// one launch, one thread per output element, with the padding modes and the summation order of
// src/smooth.h. The arithmetic is in the dtype of the table, as the reference does: float16
// and bfloat16 values go through Rounded<H>, which rounds after every operation exactly as
// c10::Half / c10::BFloat16 arithmetic does (compute in float, round to nearest even), so the
// results are the bits of the CPU kernel and the reference. scipy's symmetry test of each pair
// of taps is computed on the fly from a float64 copy of the window: nothing is read back to the
// host, and the window may be of any length.
#include <algorithm>
#include <string_view>

#include "checks.h"
#include "common.cuh"
#include "smooth.h"

namespace dirfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// A float16 / bfloat16 value whose arithmetic rounds after each operation (c10 semantics).
template <typename H>
struct Rounded {
  H v;
  Rounded() = default;
  __device__ Rounded(float f) : v(from_acc<H>(f)) {}
  __device__ float value() const { return to_acc<float>(v); }
};
template <typename H>
__device__ __forceinline__ Rounded<H> operator+(Rounded<H> a, Rounded<H> b) {
  return Rounded<H>(a.value() + b.value());
}
template <typename H>
__device__ __forceinline__ Rounded<H> operator*(Rounded<H> a, Rounded<H> b) {
  return Rounded<H>(a.value() * b.value());
}

// A float / double whose products and sums are never fused into one FMA: nvcc contracts
// a * b + c by default, even across the casts of src/smooth.h, and one rounding instead of two
// changes the last bit -- the reference (and scipy, and the LDS truncation quirk) round twice.
template <typename F>
struct Unfused {
  F v;
  Unfused() = default;
  __device__ Unfused(F f) : v(f) {}
};
__device__ __forceinline__ Unfused<float> operator+(Unfused<float> a, Unfused<float> b) { return __fadd_rn(a.v, b.v); }
__device__ __forceinline__ Unfused<float> operator*(Unfused<float> a, Unfused<float> b) { return __fmul_rn(a.v, b.v); }
__device__ __forceinline__ Unfused<double> operator+(Unfused<double> a, Unfused<double> b) { return __dadd_rn(a.v, b.v); }
__device__ __forceinline__ Unfused<double> operator*(Unfused<double> a, Unfused<double> b) { return __dmul_rn(a.v, b.v); }

// The arithmetic type of a storage type.
template <typename T> struct Arith;
template <> struct Arith<float> { using type = Unfused<float>; };
template <> struct Arith<double> { using type = Unfused<double>; };
template <> struct Arith<__half> { using type = Rounded<__half>; };
template <> struct Arith<__nv_bfloat16> { using type = Rounded<__nv_bfloat16>; };

struct SymmetricPair {
  const double* w64;
  int64_t h;
  __device__ bool operator()(int64_t j) const { return window_pair_symmetric(w64[h - j], w64[h + j]); }
};

template <typename A>
__global__ void smooth_bins_kernel(const A* __restrict__ stats, A* __restrict__ out,
                                   int64_t num_bins, int64_t columns, const A* __restrict__ w,
                                   const double* __restrict__ w64, int64_t h, Padding padding) {
  const int64_t total = num_bins * columns;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / columns;
    const int64_t c = i - b * columns;
    out[i] = smooth_bin_with<A>(stats + c, columns, num_bins, b, w, SymmetricPair{w64, h}, h,
                                padding);
  }
}

Tensor smooth_bins_cuda(const Tensor& stats, const Tensor& window, std::string_view padding) {
  const char* op = "dirfast::smooth_bins";
  check_smooth_bins_args(stats, window, op, torch::headeronly::DeviceType::CUDA);
  const Padding mode = parse_padding(padding, op);
  const auto guard = device_guard(stats);
  return write_like(stats, [&](const Tensor& out) {
    const Tensor src = torch::stable::contiguous(stats);
    const Tensor w = contiguous_as(window, stats.scalar_type());
    const Tensor w64 = contiguous_as(window, ScalarType::Double);  // scipy's symmetry test, on the fly
    const int64_t num_bins = stats.size(0), columns = stats.dim() == 2 ? stats.size(1) : 1;
    const int64_t blocks = std::min<int64_t>(ceil_div(num_bins * columns, kThreads), 65535);
    const cudaStream_t stream = current_stream(stats);
    dispatch_cuda_float(stats.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      using A = typename Arith<T>::type;
      static_assert(sizeof(A) == sizeof(T), "the arithmetic type must have the layout of T");
      smooth_bins_kernel<A><<<blocks, kThreads, 0, stream>>>(
          static_cast<const A*>(src.const_data_ptr()), static_cast<A*>(out.mutable_data_ptr()), num_bins, columns,
          static_cast<const A*>(w.const_data_ptr()), w64.const_data_ptr<double>(), (window.size(0) - 1) / 2, mode);
    });
    check_launch(op);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("smooth_bins", TORCH_BOX(&dirfast::cuda::smooth_bins_cuda));
}
