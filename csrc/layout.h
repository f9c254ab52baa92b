// What the CPU and CUDA glue share: argument checks, outputs, and how the kernels walk a feature tensor x of shape [N, D] or [B, C, *spatial] in place.
//
// A "row" is one sample: a row of [N, D], or one pixel (b, *spatial) of a dense tensor. Rows are
// numbered in the C order of bin_idx ([N] or [B, *spatial]). Two memory layouts are read and
// written without a copy:
//
//   kRows    element (r, d) at r * row_stride + d: [N, D] row-major (row_stride may exceed D),
//            channels-last dense tensors (x.movedim(1, -1) contiguous), any D == 1 tensor whose
//            rows collapse to one stride;
//   kPlanar  element (b, c, s) at b * batch_stride + c * feature_stride + s, where s runs over the
//            flattened spatial positions with unit stride: contiguous [B, C, *spatial] (each
//            channel plane read along the spatial axis), and column-major [N, D] (viewed as
//            [1, D, N]).
//
// Anything else (e.g. a tensor sliced along its last axis) is copied once with .contiguous()
// by the kernel, the only copy of x any kernel makes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "dirfast_schemas.h"

#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace dirfast {

struct Layout {
  enum Kind { kNone, kRows, kPlanar };
  Kind kind = kNone;
  int64_t rows = 0;            // N, or B * prod(spatial)
  int64_t dim = 0;             // D (features along dim 1)
  int64_t row_stride = 0;      // kRows
  int64_t batch = 0;           // kPlanar: B (1 for a column-major [N, D])
  int64_t inner = 0;           // kPlanar: positions per batch item (prod(spatial), or N)
  int64_t batch_stride = 0;    // kPlanar
  int64_t feature_stride = 0;  // kPlanar
};

// Whether the dims `order` (outermost first) of t collapse into one dimension, ignoring dims of
// size 1; `stride` gets the stride of the collapsed dimension (`fallback` when all have size 1).
inline bool collapse(const at::Tensor& t, const std::vector<int64_t>& order, int64_t fallback,
                     int64_t* stride) {
  std::vector<int64_t> kept;
  for (int64_t d : order) {
    if (t.size(d) != 1) kept.push_back(d);
  }
  if (kept.empty()) {
    *stride = fallback;
    return true;
  }
  for (size_t i = 0; i + 1 < kept.size(); ++i) {
    if (t.stride(kept[i]) != t.stride(kept[i + 1]) * t.size(kept[i + 1])) return false;
  }
  *stride = t.stride(kept.back());
  return true;
}

// The layout of t, or kNone when it is neither (then the caller makes it contiguous).
inline Layout classify(const at::Tensor& t) {
  Layout layout;
  const int64_t n = t.dim();
  layout.dim = t.size(1);
  int64_t spatial = 1;
  for (int64_t d = 2; d < n; ++d) spatial *= t.size(d);
  layout.rows = t.size(0) * spatial;

  std::vector<int64_t> row_dims{0};
  for (int64_t d = 2; d < n; ++d) row_dims.push_back(d);
  int64_t stride = 0;
  if ((layout.dim <= 1 || t.stride(1) == 1) && collapse(t, row_dims, layout.dim, &stride)) {
    layout.kind = Layout::kRows;
    layout.row_stride = stride;
    return layout;
  }
  if (n == 2) {
    if (t.size(0) <= 1 || t.stride(0) == 1) {  // column-major [N, D]: [1, D, N]
      layout.kind = Layout::kPlanar;
      layout.batch = 1;
      layout.inner = t.size(0);
      layout.batch_stride = 0;
      layout.feature_stride = t.stride(1);
    }
    return layout;
  }
  std::vector<int64_t> spatial_dims;
  for (int64_t d = 2; d < n; ++d) spatial_dims.push_back(d);
  if (collapse(t, spatial_dims, 1, &stride) && stride == 1) {
    layout.kind = Layout::kPlanar;
    layout.batch = t.size(0);
    layout.inner = spatial;
    layout.batch_stride = t.stride(0);
    layout.feature_stride = t.stride(1);
  }
  return layout;
}

// A tensor with the values of x in a layout of the given kind (x itself when it already is).
inline at::Tensor in_layout(const at::Tensor& x, Layout::Kind kind) {
  if (classify(x).kind == kind) return x;
  if (kind == Layout::kRows) return x.movedim(1, -1).contiguous().movedim(-1, 1);
  return x.contiguous();
}

// The layout x is read in: its own when it has one, else that of x.contiguous().
inline at::Tensor readable(const at::Tensor& x) {
  return classify(x).kind == Layout::kNone ? x.contiguous() : x;
}

// The statistics of calibrate in its arithmetic dtype (as dirfast.reference.calibrate: float64
// when x or src_mean is float64, else float32), contiguous.
struct CalibrateTables {
  bool wide = false;  // float64 arithmetic
  at::Tensor src_mean, src_var, dst_mean, dst_var;
};

inline CalibrateTables calibrate_tables(const at::Tensor& x, const at::Tensor& src_mean,
                                        const at::Tensor& src_var, const at::Tensor& dst_mean,
                                        const at::Tensor& dst_var) {
  CalibrateTables tables;
  tables.wide = x.scalar_type() == at::kDouble || src_mean.scalar_type() == at::kDouble;
  const auto acc_type = tables.wide ? at::kDouble : at::kFloat;
  tables.src_mean = src_mean.to(acc_type).contiguous();
  tables.src_var = src_var.to(acc_type).contiguous();
  tables.dst_mean = dst_mean.to(acc_type).contiguous();
  tables.dst_var = dst_var.to(acc_type).contiguous();
  return tables;
}

// What calibrate reads and where it writes, for x and an output y shaped like it (y may be x):
// y itself when it has a layout the kernels walk and x can be read in the same kind of layout
// (x as it is, or copied once); otherwise a fresh contiguous output, copied into y afterwards.
struct CalibratePlan {
  at::Tensor x, out;
  Layout lx, ly;
};

inline CalibratePlan plan_calibrate(const at::Tensor& x, const at::Tensor& y) {
  CalibratePlan plan;
  plan.out = y;
  plan.ly = classify(y);
  if (plan.ly.kind != Layout::kNone) plan.x = in_layout(x, plan.ly.kind);
  if (plan.ly.kind == Layout::kNone || classify(plan.x).kind != plan.ly.kind) {  // unusual strides
    plan.out = at::empty(x.sizes(), x.options());
    plan.ly = classify(plan.out);
    plan.x = x.contiguous();
  }
  plan.lx = classify(plan.x);
  TORCH_INTERNAL_ASSERT(plan.lx.kind == plan.ly.kind && plan.lx.kind != Layout::kNone);
  return plan;
}

// The floating dtypes the ops take.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The argument checks of an op on (x, bin_idx), named in the messages; both on `device_type`
// (and on one device).
inline void check_features_and_bins(const at::Tensor& x, const at::Tensor& bin_idx,
                                    const char* op,
                                    c10::DeviceType device_type = c10::DeviceType::CPU) {
  const std::string where = c10::DeviceTypeName(device_type);
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", where,
              " tensor, got one on ", x.device());
  TORCH_CHECK(bin_idx.device() == x.device(), op, ": bin_idx must be on the device of x (",
              x.device(), "), got one on ", bin_idx.device());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, D] or [B, C, *spatial], got shape ", x.sizes());
  TORCH_CHECK(bin_idx.scalar_type() == at::kLong || bin_idx.scalar_type() == at::kInt, op,
              ": bin_idx must be int64 or int32, got ", bin_idx.scalar_type());
  std::vector<int64_t> expected{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) expected.push_back(x.size(d));
  TORCH_CHECK(bin_idx.sizes() == at::IntArrayRef(expected), op, ": bin_idx must have shape ",
              at::IntArrayRef(expected), " to match x of shape ", x.sizes(),
              " (one index per row, features along dim 1), got ", bin_idx.sizes());
}

// The arguments of calibrate / calibrate_: the tables src_mean, src_var, dst_mean, dst_var are
// [B, D] on the device of x.
inline void check_calibrate_args(const at::Tensor& x, const at::Tensor& bin_idx,
                                 const at::Tensor& src_mean, const at::Tensor& src_var,
                                 const at::Tensor& dst_mean, const at::Tensor& dst_var,
                                 double clip_min, double clip_max, const char* op,
                                 c10::DeviceType device_type) {
  check_features_and_bins(x, bin_idx, op, device_type);
  const int64_t dim = x.size(1);
  TORCH_CHECK(src_mean.dim() == 2 && src_mean.size(1) == dim, op,
              ": src_mean must be [B, D] with D = ", dim, " (x.shape[1]), got shape ",
              src_mean.sizes());
  TORCH_CHECK(src_mean.size(0) < std::numeric_limits<int32_t>::max(), op,
              ": src_mean must have fewer than 2^31 - 1 bins, got ", src_mean.size(0));
  const std::pair<const char*, const at::Tensor*> tables[] = {
      {"src_mean", &src_mean}, {"src_var", &src_var},
      {"dst_mean", &dst_mean}, {"dst_var", &dst_var}};
  for (const auto& entry : tables) {
    const at::Tensor& table = *entry.second;
    TORCH_CHECK(table.device() == x.device(), op, ": ", entry.first,
                " must be on the device of x (", x.device(), "), got one on ", table.device());
    TORCH_CHECK(is_supported_float(table.scalar_type()), op, ": ", entry.first,
                " must be float16, bfloat16, float32 or float64, got ", table.scalar_type());
    TORCH_CHECK(table.sizes() == src_mean.sizes(), op, ": ", entry.first, " must have shape ",
                src_mean.sizes(), " (that of src_mean), got ", table.sizes());
  }
  TORCH_CHECK(clip_min >= 0 && clip_min <= clip_max, op,
              ": clip_min and clip_max must satisfy 0 <= clip_min <= clip_max, got ", clip_min,
              " and ", clip_max);
}

// The arguments of smooth_bins: stats [B] or [B, D], an odd 1-D window, on one device.
inline void check_smooth_bins_args(const at::Tensor& stats, const at::Tensor& window,
                                   const char* op, c10::DeviceType device_type) {
  const std::string where = c10::DeviceTypeName(device_type);
  TORCH_CHECK(stats.device().type() == device_type, op, ": stats must be a ", where,
              " tensor, got one on ", stats.device());
  TORCH_CHECK(window.device() == stats.device(), op, ": window must be on the device of stats (",
              stats.device(), "), got one on ", window.device());
  TORCH_CHECK(is_supported_float(stats.scalar_type()), op,
              ": stats must be float16, bfloat16, float32 or float64, got ", stats.scalar_type());
  TORCH_CHECK(is_supported_float(window.scalar_type()), op,
              ": window must be float16, bfloat16, float32 or float64, got ", window.scalar_type());
  TORCH_CHECK((stats.dim() == 1 || stats.dim() == 2) && stats.size(0) >= 1, op,
              ": stats must be [B] or [B, D] with B >= 1, got shape ", stats.sizes());
  TORCH_CHECK(window.dim() == 1 && window.size(0) % 2 == 1, op,
              ": window must be 1-D with an odd length, got shape ", window.sizes());
}

// The padding argument of smooth_bins, as the value of dirfast::Padding (src/smooth.h): its index
// in kPaddings (generated from dirfast/_schema.py).
inline int parse_padding(c10::string_view padding, const char* op) {
  const std::string name(padding.data(), padding.size());
  std::string known;
  for (size_t i = 0; i < sizeof(kPaddings) / sizeof(kPaddings[0]); ++i) {
    if (name == kPaddings[i]) return static_cast<int>(i);
    known += (i ? ", '" : "'") + std::string(kPaddings[i]) + "'";
  }
  TORCH_CHECK(false, op, ": padding must be one of ", known, ", got '", name, "'");
}

// The outputs of bin_stats, after its argument checks: count int64 [B], mean and var [B, D] in
// the accumulation dtype (float32 for float16 / bfloat16 / float32 x, float64 for float64).
struct BinStatsOutputs {
  at::Tensor count, mean, var;
};

inline BinStatsOutputs bin_stats_outputs(const at::Tensor& x, const at::Tensor& bin_idx,
                                         int64_t num_bins, c10::DeviceType device_type) {
  const char* op = "dirfast::bin_stats";
  check_features_and_bins(x, bin_idx, op, device_type);
  TORCH_CHECK(num_bins >= 1, op, ": num_bins must be at least 1, got ", num_bins);
  TORCH_CHECK(num_bins <= std::numeric_limits<int32_t>::max(), op,
              ": num_bins must be below 2^31, got ", num_bins);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t dim = x.size(1);
  return BinStatsOutputs{at::empty({num_bins}, x.options().dtype(at::kLong)),
                         at::empty({num_bins, dim}, x.options().dtype(acc_type)),
                         at::empty({num_bins, dim}, x.options().dtype(acc_type))};
}

// calibrate_ writes every element of x once: an expanded x (elements sharing memory) cannot be.
inline void check_calibrate_inplace(const at::Tensor& x) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes,
              "dirfast::calibrate_: x has elements that share memory (an expanded tensor); "
              "calibrate it out of place");
}

// The two registered entry points of calibrate on a backend, over that backend's
// calibrate_into(op, x, y, ...), which calibrates x into y (y may be x).
using CalibrateInto = void (*)(const char*, const at::Tensor&, at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, double);

template <CalibrateInto into>
at::Tensor calibrate_out_of_place(const at::Tensor& x, const at::Tensor& bin_idx,
                                  const at::Tensor& src_mean, const at::Tensor& src_var,
                                  const at::Tensor& dst_mean, const at::Tensor& dst_var,
                                  double clip_min, double clip_max) {
  at::Tensor y = at::empty_like(x);  // the fake kernel's strides
  into("dirfast::calibrate", x, y, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min,
       clip_max);
  return y;
}

template <CalibrateInto into>
void calibrate_in_place(at::Tensor& x, const at::Tensor& bin_idx, const at::Tensor& src_mean,
                        const at::Tensor& src_var, const at::Tensor& dst_mean,
                        const at::Tensor& dst_var, double clip_min, double clip_max) {
  check_calibrate_inplace(x);
  into("dirfast::calibrate_", x, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min,
       clip_max);
}

// What smooth_bins reads and writes, after its argument checks: `result` has the strides of
// torch.empty_like(stats) (the fake kernel's); the kernels write the contiguous `out` (result
// itself when contiguous, else copied into it) from the contiguous `src`, with the window in
// the dtype of stats (`w`) and in float64 (`w64`, for scipy's symmetry test).
struct SmoothBinsPlan {
  at::Tensor result, out, src, w, w64;
  int64_t columns = 1;
  int padding = 0;
};

inline SmoothBinsPlan plan_smooth_bins(const at::Tensor& stats, const at::Tensor& window,
                                       c10::string_view padding, c10::DeviceType device_type) {
  const char* op = "dirfast::smooth_bins";
  check_smooth_bins_args(stats, window, op, device_type);
  SmoothBinsPlan plan;
  plan.padding = parse_padding(padding, op);
  plan.result = at::empty_like(stats);
  plan.columns = stats.dim() == 2 ? stats.size(1) : 1;
  if (stats.numel() == 0) return plan;
  plan.out = plan.result.is_contiguous() ? plan.result : at::empty(stats.sizes(), stats.options());
  plan.src = stats.contiguous();
  plan.w = window.to(stats.scalar_type()).contiguous();
  plan.w64 = window.to(at::kDouble).contiguous();
  return plan;
}

}  // namespace dirfast
