// dirfast::calibrate and dirfast::calibrate_ for CUDA tensors: checks, the layout plan shared with
// the CPU kernel (csrc/plans.h), scratch for the s/t tables, then the kernels of
// src/calibrate.cu on the current stream. Nothing here waits for the GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "glue.h"
#include "plans.h"

namespace dirfast {
namespace cuda {
namespace {

void calibrate_into(const char* op, const at::Tensor& x, at::Tensor& y, const at::Tensor& bin_idx,
                    const at::Tensor& src_mean, const at::Tensor& src_var,
                    const at::Tensor& dst_mean, const at::Tensor& dst_var, double clip_min,
                    double clip_max) {
  check_calibrate_args(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, op,
                       c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(x.device());
  const CalibrateTables tables = calibrate_tables(x, src_mean, src_var, dst_mean, dst_var);
  if (x.numel() == 0) return;

  CalibratePlan plan = plan_calibrate(x, y);
  const at::Tensor idx = bin_idx.contiguous();
  const DirfastFeatures features_of_x = features(plan.x, plan.lx);
  const DirfastBins bins_of_x = bins(idx, src_mean.size(0));
  const int acc_code = tables.wide ? DIRFAST_FLOAT64 : DIRFAST_FLOAT32;
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(dirfast_cuda_calibrate_workspace(features_of_x, bins_of_x, acc_code))},
      x.options().dtype(at::kByte));
  check_launch(dirfast_cuda_calibrate(features_of_x, output(plan.out, plan.ly), bins_of_x,
                                      tables.src_mean.data_ptr(), tables.src_var.data_ptr(),
                                      tables.dst_mean.data_ptr(), tables.dst_var.data_ptr(),
                                      acc_code, clip_min, clip_max, workspace.data_ptr(),
                                      sm_count(x.device()),
                                      current_stream(x.device())),
               op);
  if (!plan.out.is_same(y)) y.copy_(plan.out);
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("calibrate", &dirfast::calibrate_out_of_place<&dirfast::cuda::calibrate_into>);
  m.impl("calibrate_", &dirfast::calibrate_in_place<&dirfast::cuda::calibrate_into>);
}
