// dirfast::smooth_bins for CUDA tensors: checks (shared with the CPU kernel), the window in the
// table's dtype and in float64, then the one kernel of src/smooth_bins.cu on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "glue.h"
#include "plans.h"

namespace dirfast {
namespace cuda {
namespace {

at::Tensor smooth_bins_cuda(const at::Tensor& stats, const at::Tensor& window,
                            c10::string_view padding) {
  const char* op = "dirfast::smooth_bins";
  const SmoothBinsPlan plan = plan_smooth_bins(stats, window, padding, c10::DeviceType::CUDA);
  at::Tensor result = plan.result;
  if (stats.numel() == 0) return result;
  const c10::DeviceGuard guard(stats.device());
  at::Tensor out = plan.out;
  check_launch(dirfast_cuda_smooth_bins(plan.src.data_ptr(), out.data_ptr(),
                                        dtype_code(stats.scalar_type()), stats.size(0),
                                        plan.columns, plan.w.data_ptr(),
                                        plan.w64.data_ptr<double>(), window.size(0),
                                        plan.padding, current_stream(stats.device())),
               op);
  if (!out.is_same(result)) result.copy_(out);
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("smooth_bins", &dirfast::cuda::smooth_bins_cuda);
}
