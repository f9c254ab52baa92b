// dirfast::calibrate on CUDA: y = x * s[b] + t[b] in one pass over x.
//
// Two launches, no host synchronisation: scale_shift_kernel computes the per-bucket tables s and
// t (src/calibrate.h, the published zero-variance rules included) for B + 1 buckets, the last one
// the identity (s = 1, t = -0.0) taken by rows whose index is outside [0, B), so the pass has no
// branch; then one pass over x in rows or planes reads each element once and writes it once,
// in 16-byte vectors when the strides allow it. y may be x (calibrate_): every element is read
// and then written by the same thread.
#include <algorithm>

#include "calibrate.h"
#include "checks.h"
#include "common.cuh"

namespace dirfast {
namespace cuda {
namespace {

constexpr int kTableThreads = 256;
constexpr int kThreads = 256;
constexpr int kPlanarChannelsPerBlock = 16;

// One block per bucket: a block-wide sum of src_var decides the bucket-wide rule.
template <typename acc_t>
__global__ void scale_shift_kernel(const acc_t* __restrict__ src_mean,
                                   const acc_t* __restrict__ src_var,
                                   const acc_t* __restrict__ dst_mean,
                                   const acc_t* __restrict__ dst_var,
                                   int64_t num_bins, int64_t dim, acc_t lo, acc_t hi,
                                   acc_t* __restrict__ s, acc_t* __restrict__ t,
                                   int64_t bucket_step, int64_t feature_step) {
  __shared__ acc_t warp_sums[kTableThreads / 32];
  __shared__ bool unchanged;
  for (int64_t k = blockIdx.x; k <= num_bins; k += gridDim.x) {
    // The bucket-wide rule: sum(src_var) < 1e-10 (the identity bucket B always).
    acc_t sum = acc_t(0);
    if (k < num_bins) {
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) sum += src_var[k * dim + d];
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = acc_t(0);
      for (int w = 0; w < kTableThreads / 32; ++w) total += warp_sums[w];
      // (A NaN sum is not below the threshold: the bucket is calibrated, as on the CPU.)
      unchanged = k == num_bins || total < static_cast<acc_t>(kCalibrateMinVarianceSum);
    }
    __syncthreads();
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      acc_t sd = acc_t(1), td = -acc_t(0);
      if (!unchanged) {
        const int64_t o = k * dim + d;
        calibrate_scale_shift<acc_t>(src_mean[o], src_var[o], dst_mean[o], dst_var[o], lo, hi, sd,
                                     td);
      }
      s[k * bucket_step + d * feature_step] = sd;
      t[k * bucket_step + d * feature_step] = td;
    }
    __syncthreads();  // warp_sums and `unchanged` are reused by the next bucket
  }
}

// Rows (stride_f == 1: [N, D] row-major, channels-last): blockDim = (threads over the
// VEC-vectors of a row, rows per block); a row's bucket is read once and its s/t rows are
// L2-resident.
template <typename T, typename acc_t, typename index_t, int VEC>
__global__ void calibrate_rows_kernel(const T* x, T* y, const index_t* __restrict__ idx,
                                      int64_t rows, int64_t dim, int64_t x_row_stride,
                                      int64_t y_row_stride,
                                      const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                                      int64_t num_bins) {
  const int64_t vectors = dim / VEC;  // VEC divides dim
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t k = bucket_of(idx, r, num_bins, num_bins);
    const T* xr = x + r * x_row_stride;
    T* yr = y + r * y_row_stride;
    const acc_t* sk = s + k * dim;
    const acc_t* tk = t + k * dim;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xr + v * VEC);
      const Vec<acc_t, VEC> sv = load_vec<acc_t, VEC>(sk + v * VEC);
      const Vec<acc_t, VEC> tv = load_vec<acc_t, VEC>(tk + v * VEC);
      Vec<T, VEC> yv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        yv.v[j] = from_acc<T>(calibrate_apply<acc_t>(to_acc<acc_t>(xv.v[j]), sv.v[j], tv.v[j]));
      }
      store_vec<T, VEC>(yr + v * VEC, yv);
    }
  }
}

// Planes (stride_s == 1: contiguous [P, C, *spatial]): a thread owns VEC consecutive pixels of
// one image, reads their buckets once, then walks a tile of channel planes along the pixels, s
// and t gathered from a feature-major table ([D, B + 1]: one channel's values side by side).
template <typename T, typename acc_t, typename index_t, int VEC>
__global__ void calibrate_planes_kernel(const T* x, T* y, const index_t* __restrict__ idx,
                                        int64_t images, int64_t inner, int64_t dim,
                                        int64_t x_stride_p, int64_t x_stride_f,
                                        int64_t y_stride_p, int64_t y_stride_f,
                                        const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                                        int64_t num_bins, int64_t channels_per_block) {
  const int64_t pixels_per_block = int64_t(blockDim.x) * VEC;
  const int64_t tiles = (inner + pixels_per_block - 1) / pixels_per_block;
  const int64_t table_stride = num_bins + 1;  // feature-major [D, B + 1]
  const int64_t c_begin = int64_t(blockIdx.y) * channels_per_block;
  const int64_t c_end = c_begin + channels_per_block < dim ? c_begin + channels_per_block : dim;
  for (int64_t tile = blockIdx.x; tile < images * tiles; tile += gridDim.x) {
    const int64_t p = tile / tiles;
    const int64_t s0 = (tile - p * tiles) * pixels_per_block + int64_t(threadIdx.x) * VEC;
    if (s0 >= inner) continue;  // VEC divides inner: a vector is all in or all out
    int64_t k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = bucket_of(idx, p * inner + s0 + j, num_bins, num_bins);
    const T* xp = x + p * x_stride_p + s0;
    T* yp = y + p * y_stride_p + s0;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xp + c * x_stride_f);
      const acc_t* sc = s + c * table_stride;
      const acc_t* tc = t + c * table_stride;
      Vec<T, VEC> yv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        yv.v[j] = from_acc<T>(calibrate_apply<acc_t>(to_acc<acc_t>(xv.v[j]), sc[k[j]], tc[k[j]]));
      }
      store_vec<T, VEC>(yp + c * y_stride_f, yv);
    }
  }
}

template <typename T, typename acc_t, typename index_t>
void launch(const Features& x, const Output& out, const index_t* idx, int64_t num_bins,
            const acc_t* src_mean, const acc_t* src_var, const acc_t* dst_mean,
            const acc_t* dst_var, double clip_min, double clip_max, acc_t* s, acc_t* t,
            int num_sms, cudaStream_t stream) {
  const int64_t dim = x.dim;
  // Rows when the features are contiguous; otherwise the glue passes planes (stride_s == 1).
  const bool planes = !(x.stride_f == 1 && x.inner == x.rows);
  const int64_t bucket_step = planes ? 1 : dim;
  const int64_t feature_step = planes ? num_bins + 1 : 1;
  const int table_blocks = static_cast<int>(num_bins + 1 < 65535 ? num_bins + 1 : 65535);
  scale_shift_kernel<acc_t><<<table_blocks, kTableThreads, 0, stream>>>(
      src_mean, src_var, dst_mean, dst_var, num_bins, dim, static_cast<acc_t>(clip_min),
      static_cast<acc_t>(clip_max), s, t, bucket_step, feature_step);
  if (x.rows == 0 || dim == 0) return;

  const T* px = static_cast<const T*>(x.data);
  T* y = static_cast<T*>(out.data);
  const int64_t max_blocks = int64_t(num_sms) * 16;
  constexpr int VEC = 16 / sizeof(T);
  if (!planes) {
    const bool vec = dim % VEC == 0 && vec_aligned<T, VEC>(px, x.stride_s) &&
                     vec_aligned<T, VEC>(y, out.stride_s);
    const int64_t vectors = vec ? dim / VEC : dim;
    int tx = 32;
    while (tx < kThreads && tx < vectors) tx *= 2;
    const dim3 block(tx, kThreads / tx);
    const int64_t blocks = std::min<int64_t>(ceil_div(x.rows, block.y), max_blocks);
    if (vec) {
      calibrate_rows_kernel<T, acc_t, index_t, VEC><<<blocks, block, 0, stream>>>(
          px, y, idx, x.rows, dim, x.stride_s, out.stride_s, s, t, num_bins);
    } else {
      calibrate_rows_kernel<T, acc_t, index_t, 1><<<blocks, block, 0, stream>>>(
          px, y, idx, x.rows, dim, x.stride_s, out.stride_s, s, t, num_bins);
    }
    return;
  }
  const int64_t images = x.rows / x.inner;
  const int64_t channels_per_block =
      std::max<int64_t>(kPlanarChannelsPerBlock, ceil_div(dim, 65535));
  const dim3 grid_shape(1, static_cast<unsigned>(ceil_div(dim, channels_per_block)));
  const bool vec = x.inner % VEC == 0 && vec_aligned<T, VEC>(px, x.stride_f) &&
                   vec_aligned<T, VEC>(px, x.stride_p) && vec_aligned<T, VEC>(y, out.stride_f) &&
                   vec_aligned<T, VEC>(y, out.stride_p);
  const int step = vec ? VEC : 1;
  const int64_t tiles = images * ceil_div(x.inner, int64_t(kThreads) * step);
  const unsigned grid_x = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(tiles, ceil_div(max_blocks, grid_shape.y))));
  const dim3 grid(grid_x, grid_shape.y);
  if (vec) {
    calibrate_planes_kernel<T, acc_t, index_t, VEC><<<grid, kThreads, 0, stream>>>(
        px, y, idx, images, x.inner, dim, x.stride_p, x.stride_f, out.stride_p, out.stride_f, s, t, num_bins,
        channels_per_block);
  } else {
    calibrate_planes_kernel<T, acc_t, index_t, 1><<<grid, kThreads, 0, stream>>>(
        px, y, idx, images, x.inner, dim, x.stride_p, x.stride_f, out.stride_p, out.stride_f, s, t, num_bins,
        channels_per_block);
  }
}

// Checks the arguments, then calibrates x into y: a fresh tensor shaped like x (calibrate) or x
// itself (calibrate_: every element is read and then written by the same thread).
void calibrate_into(const char* op, const Tensor& x, Tensor y, const Tensor& bin_idx, const Tensor& src_mean,
                    const Tensor& src_var, const Tensor& dst_mean, const Tensor& dst_var, double clip_min,
                    double clip_max) {
  check_calibrate_args(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, op,
                       torch::headeronly::DeviceType::CUDA);
  if (x.get() == y.get()) check_writable_in_place(x, op);
  const auto guard = device_guard(x);
  const ScalarType acc = acc_type({x.scalar_type(), src_mean.scalar_type()});
  const Tensor m1 = contiguous_as(src_mean, acc), v1 = contiguous_as(src_var, acc);
  const Tensor m2 = contiguous_as(dst_mean, acc), v2 = contiguous_as(dst_var, acc);
  if (x.numel() == 0) return;
  const InOut plan = plan_in_out(x, y);
  const Tensor idx = torch::stable::contiguous(bin_idx);
  const int64_t num_bins = src_mean.size(0);
  // s and t tables of B + 1 buckets (the last one the identity), filled by scale_shift_kernel.
  Tensor s = empty({(num_bins + 1) * std::max<int64_t>(x.size(1), 1)}, acc, x);
  Tensor t = empty({(num_bins + 1) * std::max<int64_t>(x.size(1), 1)}, acc, x);
  const Features fx = features(plan.x, plan.lx);
  const Output fy = output(plan.out, plan.ly);
  const int num_sms = sm_count(x);
  const cudaStream_t stream = current_stream(x);
  dispatch_cuda_float(x.scalar_type(), op, [&](auto scalar) {
    using T = decltype(scalar);
    dispatch_acc(acc, [&](auto acc_scalar) {
      using acc_t = decltype(acc_scalar);
      dispatch_index(idx.scalar_type(), [&](auto index) {
        using index_t = decltype(index);
        launch<T, acc_t, index_t>(fx, fy, idx.const_data_ptr<index_t>(), num_bins, m1.const_data_ptr<acc_t>(),
                                  v1.const_data_ptr<acc_t>(), m2.const_data_ptr<acc_t>(), v2.const_data_ptr<acc_t>(),
                                  clip_min, clip_max, s.mutable_data_ptr<acc_t>(), t.mutable_data_ptr<acc_t>(),
                                  num_sms, stream);
      });
    });
  });
  check_launch(op);
  if (plan.out.get() != y.get()) torch::stable::copy_(y, plan.out);
}

Tensor calibrate_cuda(const Tensor& x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                     const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  Tensor y = torch::stable::empty_like(x);  // the fake kernel's strides
  calibrate_into("dirfast::calibrate", x, y, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
  return y;
}

void calibrate_inplace_cuda(Tensor x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                           const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  calibrate_into("dirfast::calibrate_", x, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("calibrate", TORCH_BOX(&dirfast::cuda::calibrate_cuda));
  m.impl("calibrate_", TORCH_BOX(&dirfast::cuda::calibrate_inplace_cuda));
}
