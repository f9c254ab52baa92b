// dirfast::calibrate on CPU: y = x * s[b] + t[b] in one pass over x.
//
// The per-bucket scale s and shift t (src/calibrate.h, the published zero-variance rules
// included) are computed once, for B + 1 buckets: the extra one is the identity (s = 1,
// t = -0.0, which gives back every value exactly), taken by rows whose index is outside [0, B),
// so the pass has no branch. x is read in place in both layouts of csrc/layout.h (others are
// copied once); y has the strides of torch.empty_like(x) (the fake kernel's). Arithmetic in
// float32, or float64 when x or src_mean is float64 (as dirfast.reference.calibrate), cast back
// to the dtype of x at the store; elementwise, so the same bits for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "calibrate.h"
#include "checks.h"
#include "layout.h"
#include "plans.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kPlanarTile = 4096;      // pixels per task (planar layout)
constexpr int64_t kRowsGrainElements = 1 << 14;

template <typename scalar_t, typename acc_t>
inline void apply_row(scalar_t* DIRFAST_RESTRICT y, const scalar_t* DIRFAST_RESTRICT x,
                      const acc_t* DIRFAST_RESTRICT s, const acc_t* DIRFAST_RESTRICT t,
                      int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    y[d] = static_cast<scalar_t>(calibrate_apply<acc_t>(static_cast<acc_t>(x[d]), s[d], t[d]));
  }
}

template <typename scalar_t, typename acc_t>
inline void apply_plane(scalar_t* DIRFAST_RESTRICT y, const scalar_t* DIRFAST_RESTRICT x,
                        const acc_t* DIRFAST_RESTRICT s, const acc_t* DIRFAST_RESTRICT t,
                        const int32_t* DIRFAST_RESTRICT bucket, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const int32_t k = bucket[i];
    y[i] = static_cast<scalar_t>(calibrate_apply<acc_t>(static_cast<acc_t>(x[i]), s[k], t[k]));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
void calibrate_kernel(const at::Tensor& x, const Layout& lx, at::Tensor& y, const Layout& ly,
                      const index_t* idx, const at::Tensor& src_mean, const at::Tensor& src_var,
                      const at::Tensor& dst_mean, const at::Tensor& dst_var, double clip_min,
                      double clip_max) {
  const int64_t num_bins = src_mean.size(0);
  const int64_t dim = lx.dim;
  const int64_t rows = lx.rows;
  const bool planar = lx.kind == Layout::kPlanar;
  auto bucket_of = [num_bins, idx](int64_t r) -> int64_t {
    const int64_t k = static_cast<int64_t>(idx[r]);
    return (k >= 0 && k < num_bins) ? k : num_bins;
  };

  // s and t of B + 1 buckets: bucket-major [B + 1, D] for the rows layout (each row reads its
  // bucket's s and t, L2-resident for the usual bucket counts, and the loop over D vectorises),
  // feature-major [D, B + 1] for the planar one (a channel's values side by side). One allocation
  // each, left uninitialised: with more buckets than rows only the buckets in use are computed.
  const int64_t entries = (num_bins + 1) * dim;
  std::unique_ptr<acc_t[]> scale(new acc_t[entries > 0 ? entries : 1]);
  std::unique_ptr<acc_t[]> shift(new acc_t[entries > 0 ? entries : 1]);
  acc_t* s = scale.get();
  acc_t* t = shift.get();
  const int64_t bucket_step = planar ? 1 : dim;
  const int64_t feature_step = planar ? num_bins + 1 : 1;
  std::vector<uint8_t> used;
  if (num_bins > rows) {
    used.assign(num_bins, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t k = bucket_of(r);
      if (k < num_bins) used[k] = 1;
    }
  }
  const acc_t* p_src_mean = src_mean.data_ptr<acc_t>();
  const acc_t* p_src_var = src_var.data_ptr<acc_t>();
  const acc_t* p_dst_mean = dst_mean.data_ptr<acc_t>();
  const acc_t* p_dst_var = dst_var.data_ptr<acc_t>();
  const acc_t lo = static_cast<acc_t>(clip_min);
  const acc_t hi = static_cast<acc_t>(clip_max);
  at::parallel_for(0, num_bins + 1, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)),
                   [&](int64_t begin, int64_t end) {
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
                         calibrate_bucket<acc_t>(p_src_mean + o, p_src_var + o, p_dst_mean + o,
                                                 p_dst_var + o, dim, lo, hi, sk, tk,
                                                 feature_step);
                       }
                     }
                   });

  const scalar_t* px = x.data_ptr<scalar_t>();
  scalar_t* py = y.data_ptr<scalar_t>();
  if (!planar) {
    const int64_t grain = std::max<int64_t>(1, kRowsGrainElements / std::max<int64_t>(dim, 1));
    const int64_t xs = lx.row_stride;
    const int64_t ys = ly.row_stride;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = bucket_of(r) * dim;
        apply_row<scalar_t, acc_t>(py + r * ys, px + r * xs, s + o, t + o, dim);
      }
    });
    return;
  }

  // Planar: a task is a tile of pixels of one batch item; their buckets are resolved once, then
  // each channel plane of the tile is streamed with s and t gathered from the channel's row.
  const int64_t inner = lx.inner;
  const int64_t tiles = (inner + kPlanarTile - 1) / kPlanarTile;
  at::parallel_for(0, lx.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<int32_t[]> bucket(new int32_t[kPlanarTile]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles;
      const int64_t s0 = (task - b * tiles) * kPlanarTile;
      const int64_t len = std::min<int64_t>(kPlanarTile, inner - s0);
      for (int64_t i = 0; i < len; ++i) {
        bucket[i] = static_cast<int32_t>(bucket_of(b * inner + s0 + i));
      }
      const scalar_t* xb = px + b * lx.batch_stride + s0;
      scalar_t* yb = py + b * ly.batch_stride + s0;
      for (int64_t c = 0; c < dim; ++c) {
        apply_plane<scalar_t, acc_t>(yb + c * ly.feature_stride, xb + c * lx.feature_stride,
                                     s + c * feature_step, t + c * feature_step, bucket.get(),
                                     len);
      }
    }
  });
}

// Calibrates x into y, which is either a fresh tensor shaped like x (calibrate) or x itself
// (calibrate_: each element is read before it is written, by the same iteration).
void calibrate_into(const char* op, const at::Tensor& x, at::Tensor& y, const at::Tensor& bin_idx,
                    const at::Tensor& src_mean, const at::Tensor& src_var,
                    const at::Tensor& dst_mean, const at::Tensor& dst_var, double clip_min,
                    double clip_max) {
  check_calibrate_args(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, op,
                       c10::DeviceType::CPU);

  const CalibrateTables tables = calibrate_tables(x, src_mean, src_var, dst_mean, dst_var);

  if (x.numel() == 0) return;
  const CalibratePlan plan = plan_calibrate(x, y);
  const at::Tensor& xw = plan.x;
  at::Tensor out = plan.out;
  const Layout& lx = plan.lx;
  const Layout& ly = plan.ly;
  const at::Tensor idx = bin_idx.contiguous();

  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dirfast::calibrate", [&] {
    auto run = [&](auto acc_tag, auto index_tag) {
      using acc_t = decltype(acc_tag);
      using index_t = decltype(index_tag);
      calibrate_kernel<scalar_t, acc_t, index_t>(xw, lx, out, ly, idx.data_ptr<index_t>(),
                                                 tables.src_mean, tables.src_var,
                                                 tables.dst_mean, tables.dst_var, clip_min,
                                                 clip_max);
    };
    const bool long_index = idx.scalar_type() == at::kLong;
    if (tables.wide) {
      long_index ? run(double(), int64_t()) : run(double(), int32_t());
    } else {
      long_index ? run(float(), int64_t()) : run(float(), int32_t());
    }
  });
  if (!out.is_same(y)) y.copy_(out);
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("calibrate", &dirfast::calibrate_out_of_place<&dirfast::cpu::calibrate_into>);
  m.impl("calibrate_", &dirfast::calibrate_in_place<&dirfast::cpu::calibrate_into>);
}
