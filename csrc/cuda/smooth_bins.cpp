// dirfast::smooth_bins for CUDA tensors: checks (shared with the CPU kernel), the window in the
// table's dtype and in float64, then the one kernel of src/smooth_bins.cu on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "glue.h"

namespace dirfast {
namespace cuda {
namespace {

at::Tensor smooth_bins_cuda(const at::Tensor& stats, const at::Tensor& window,
                            c10::string_view padding) {
  const char* op = "dirfast::smooth_bins";
  check_smooth_bins_args(stats, window, op, c10::DeviceType::CUDA);
  const int mode = parse_padding(padding, op);
  const c10::DeviceGuard guard(stats.device());
  at::Tensor result = at::empty_like(stats);  // the fake kernel's strides
  if (stats.numel() == 0) return result;
  at::Tensor out = result.is_contiguous() ? result : at::empty(stats.sizes(), stats.options());
  const at::Tensor src = stats.contiguous();
  const at::Tensor w = window.to(stats.scalar_type()).contiguous();
  const at::Tensor w64 = window.to(at::kDouble).contiguous();
  const int64_t columns = stats.dim() == 2 ? stats.size(1) : 1;
  check_launch(dirfast_cuda_smooth_bins(src.data_ptr(), out.data_ptr(),
                                        dtype_code(stats.scalar_type()), stats.size(0), columns,
                                        w.data_ptr(), w64.data_ptr<double>(), window.size(0),
                                        mode, current_stream(stats.device())),
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
