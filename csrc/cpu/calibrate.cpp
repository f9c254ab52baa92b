// dirfast::calibrate and dirfast::calibrate_ on CPU: y = x * s[b] + t[b] in one pass over x.
//
// The per-bucket scale s and shift t (src/calibrate.h, the published zero-variance rules
// included) are computed once, for B + 1 buckets: the extra one is the identity (s = 1,
// t = -0.0, which gives back every value exactly), taken by rows whose index is outside [0, B),
// so the pass has no branch. x is read in place in both layouts of csrc/layout.h (others are
// copied once); calibrate's y has the strides of torch.empty_like(x) (the fake kernel's),
// calibrate_ writes into x (each element read before it is written, by the same iteration).
// Arithmetic in float32, or float64 when x or src_mean is float64, cast back to the dtype of x
// at the store; elementwise, so the same bits for any number of threads.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "calibrate.h"
#include "checks.h"
#include "layout.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kPlanarTile = 4096;  // pixels per task (planar layout)
constexpr int64_t kRowsGrainElements = 1 << 14;

// The bucket of row r: its index when in [0, B), else the identity bucket B.
template <typename index_t>
inline int64_t bucket_of(const index_t* idx, int64_t r, int64_t num_bins) {
  const int64_t k = static_cast<int64_t>(idx[r]);
  return (k >= 0 && k < num_bins) ? k : num_bins;
}

// s and t of B + 1 buckets: bucket-major [B + 1, D] for the rows layout (each row reads its
// bucket's s and t, and the loop over D vectorises), feature-major [D, B + 1] for the planar one
// (a channel's values side by side). With more buckets than rows, only the buckets in use.
template <typename acc_t, typename index_t>
DIRFAST_NOINLINE void scale_shift_tables(const acc_t* src_mean, const acc_t* src_var,
                                         const acc_t* dst_mean, const acc_t* dst_var,
                                         int64_t num_bins, int64_t dim, acc_t lo, acc_t hi,
                                         const index_t* idx, int64_t rows, bool planar, acc_t* s,
                                         acc_t* t) {
  const int64_t bucket_step = planar ? 1 : dim;
  const int64_t feature_step = planar ? num_bins + 1 : 1;
  std::vector<uint8_t> used;
  if (num_bins > rows) {
    used.assign(num_bins, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t k = bucket_of(idx, r, num_bins);
      if (k < num_bins) used[k] = 1;
    }
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1));
  torch::stable::parallel_for(0, num_bins + 1, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* sk = s + k * bucket_step;
      acc_t* tk = t + k * bucket_step;
      if (k == num_bins) {  // the identity, for indices outside [0, B)
        for (int64_t d = 0; d < dim; ++d) {
          sk[d * feature_step] = acc_t(1);
          tk[d * feature_step] = -acc_t(0);
        }
      } else if (used.empty() || used[k]) {
        const int64_t o = k * dim;
        calibrate_bucket<acc_t>(src_mean + o, src_var + o, dst_mean + o, dst_var + o, dim, lo, hi,
                                sk, tk, feature_step);
      }
    }
  });
}

// One row: y = x * s + t along the D features (restrict parameters: the loop vectorises).
template <typename T, typename acc_t>
inline void apply_row(T* DIRFAST_RESTRICT y, const T* DIRFAST_RESTRICT x, const acc_t* DIRFAST_RESTRICT s,
                      const acc_t* DIRFAST_RESTRICT t, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    y[d] = static_cast<T>(calibrate_apply<acc_t>(static_cast<acc_t>(x[d]), s[d], t[d]));
  }
}

// One channel plane of a tile: y[i] = x[i] * s[bucket[i]] + t[bucket[i]].
template <typename T, typename acc_t>
inline void apply_plane(T* DIRFAST_RESTRICT y, const T* DIRFAST_RESTRICT x, const acc_t* DIRFAST_RESTRICT s,
                        const acc_t* DIRFAST_RESTRICT t, const int32_t* DIRFAST_RESTRICT bucket, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const int32_t k = bucket[i];
    y[i] = static_cast<T>(calibrate_apply<acc_t>(static_cast<acc_t>(x[i]), s[k], t[k]));
  }
}

// Rows layout: each row reads its bucket's s and t rows.
template <typename T, typename acc_t, typename index_t>
DIRFAST_NOINLINE void apply_rows(const T* x, int64_t x_stride, T* y, int64_t y_stride,
                                 const index_t* idx, int64_t rows, int64_t dim, int64_t num_bins,
                                 const acc_t* s, const acc_t* t) {
  const int64_t grain = std::max<int64_t>(1, kRowsGrainElements / std::max<int64_t>(dim, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = bucket_of(idx, r, num_bins) * dim;
      apply_row<T, acc_t>(y + r * y_stride, x + r * x_stride, s + o, t + o, dim);
    }
  });
}

// Planar layout: a task is a tile of pixels of one batch item; their buckets are resolved once,
// then each channel plane of the tile is streamed with s and t gathered from the channel's row.
template <typename T, typename acc_t, typename index_t>
DIRFAST_NOINLINE void apply_planes(const T* x, const Layout& lx, T* y, const Layout& ly,
                                   const index_t* idx, int64_t num_bins, const acc_t* s,
                                   const acc_t* t) {
  const int64_t inner = lx.inner;
  const int64_t dim = lx.dim;
  const int64_t feature_step = num_bins + 1;
  const int64_t tiles = (inner + kPlanarTile - 1) / kPlanarTile;
  torch::stable::parallel_for(0, lx.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<int32_t[]> bucket(new int32_t[kPlanarTile]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles;
      const int64_t s0 = (task - b * tiles) * kPlanarTile;
      const int64_t len = std::min<int64_t>(kPlanarTile, inner - s0);
      for (int64_t i = 0; i < len; ++i) {
        bucket[i] = static_cast<int32_t>(bucket_of(idx, b * inner + s0 + i, num_bins));
      }
      const T* xb = x + b * lx.batch_stride + s0;
      T* yb = y + b * ly.batch_stride + s0;
      for (int64_t c = 0; c < dim; ++c) {
        apply_plane<T, acc_t>(yb + c * ly.feature_stride, xb + c * lx.feature_stride, s + c * feature_step,
                              t + c * feature_step, bucket.get(), len);
      }
    }
  });
}

// Checks the arguments, then calibrates x into y: a fresh tensor shaped like x (calibrate) or x
// itself (calibrate_).
void calibrate_into(const char* op, const Tensor& x, Tensor y, const Tensor& bin_idx,
                    const Tensor& src_mean, const Tensor& src_var, const Tensor& dst_mean,
                    const Tensor& dst_var, double clip_min, double clip_max) {
  check_calibrate_args(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, op,
                       torch::headeronly::DeviceType::CPU);
  if (x.get() == y.get()) check_writable_in_place(x, op);
  const ScalarType acc = acc_type({x.scalar_type(), src_mean.scalar_type()});
  const Tensor m1 = contiguous_as(src_mean, acc), v1 = contiguous_as(src_var, acc);
  const Tensor m2 = contiguous_as(dst_mean, acc), v2 = contiguous_as(dst_var, acc);
  if (x.numel() == 0) return;
  const InOut plan = plan_in_out(x, y);
  const Tensor idx = torch::stable::contiguous(bin_idx);
  const int64_t num_bins = src_mean.size(0);
  const int64_t dim = plan.lx.dim;
  const bool planar = plan.lx.kind == Layout::kPlanar;

  dispatch_float(x.scalar_type(), op, [&](auto scalar) {
    using T = decltype(scalar);
    dispatch_acc(acc, [&](auto acc_scalar) {
      using acc_t = decltype(acc_scalar);
      dispatch_index(idx.scalar_type(), [&](auto index) {
        using index_t = decltype(index);
        const index_t* pi = idx.const_data_ptr<index_t>();
        const int64_t entries = std::max<int64_t>((num_bins + 1) * dim, 1);
        std::unique_ptr<acc_t[]> s(new acc_t[entries]);  // left uninitialised: see scale_shift_tables
        std::unique_ptr<acc_t[]> t(new acc_t[entries]);
        scale_shift_tables<acc_t, index_t>(m1.const_data_ptr<acc_t>(), v1.const_data_ptr<acc_t>(),
                                           m2.const_data_ptr<acc_t>(), v2.const_data_ptr<acc_t>(),
                                           num_bins, dim, static_cast<acc_t>(clip_min),
                                           static_cast<acc_t>(clip_max), pi, plan.lx.rows, planar,
                                           s.get(), t.get());
        const T* px = plan.x.const_data_ptr<T>();
        T* py = plan.out.mutable_data_ptr<T>();
        if (planar) {
          apply_planes<T, acc_t, index_t>(px, plan.lx, py, plan.ly, pi, num_bins, s.get(), t.get());
        } else {
          apply_rows<T, acc_t, index_t>(px, plan.lx.row_stride, py, plan.ly.row_stride, pi,
                                        plan.lx.rows, dim, num_bins, s.get(), t.get());
        }
      });
    });
  });
  if (plan.out.get() != y.get()) torch::stable::copy_(y, plan.out);
}

Tensor calibrate_cpu(const Tensor& x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                     const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  Tensor y = torch::stable::empty_like(x);  // the fake kernel's strides
  calibrate_into("dirfast::calibrate", x, y, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
  return y;
}

void calibrate_inplace_cpu(Tensor x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                           const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  calibrate_into("dirfast::calibrate_", x, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("calibrate", TORCH_BOX(&dirfast::cpu::calibrate_cpu));
  m.impl("calibrate_", TORCH_BOX(&dirfast::cpu::calibrate_inplace_cpu));
}
