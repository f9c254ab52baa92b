// What the CPU and CUDA backends of each op share once the arguments are checked: the outputs
// of bin_stats, the calibrate tables in their arithmetic dtype and the layouts calibrate reads
// and writes, its two registered entry points (out of place and in place) over a backend's
// calibrate_into, and the inputs and output of smooth_bins.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "checks.h"
#include "layout.h"

namespace dirfast {

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
