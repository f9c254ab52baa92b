// dirfast::bin_stats for CUDA tensors: checks, outputs and scratch, then the kernels of
// src/bin_stats.cu on the current stream. Nothing here waits for the GPU.
//
// With torch.use_deterministic_algorithms(True) the rows are grouped by bucket first (a stable
// sort of the indices and a searchsorted for each bucket's offset, both deterministic torch ops)
// and the deterministic kernel makes one pass per (bucket, feature) in that order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "glue.h"
#include "layout.h"
#include "plans.h"

namespace dirfast {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bin_stats_cuda(const at::Tensor& x,
                                                              const at::Tensor& bin_idx,
                                                              int64_t num_bins) {
  const char* op = "dirfast::bin_stats";
  BinStatsOutputs outputs = bin_stats_outputs(x, bin_idx, num_bins, c10::DeviceType::CUDA);
  at::Tensor& count = outputs.count;
  at::Tensor& mean = outputs.mean;
  at::Tensor& var = outputs.var;
  const c10::DeviceGuard guard(x.device());

  const at::Tensor xr = readable(x);  // a copy only for layouts the kernels do not walk
  const Layout layout = classify(xr);
  TORCH_INTERNAL_ASSERT(layout.kind != Layout::kNone);
  const at::Tensor idx = bin_idx.contiguous();
  const DirfastFeatures features_of_x = features(xr, layout);
  const cudaStream_t stream = current_stream(x.device());

  if (at::globalContext().deterministicAlgorithms()) {
    const at::Tensor flat = idx.reshape({-1}).to(at::kLong);
    const at::Tensor key = at::where((flat >= 0) & (flat < num_bins), flat, num_bins);
    const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor perm = std::get<1>(sorted).contiguous();
    const at::Tensor offsets =
        at::searchsorted(std::get<0>(sorted), at::arange(num_bins + 1, flat.options()));
    count.copy_(offsets.slice(0, 1) - offsets.slice(0, 0, num_bins));
    check_launch(dirfast_cuda_bin_stats_sorted(features_of_x, num_bins, perm.data_ptr<int64_t>(),
                                               offsets.data_ptr<int64_t>(), mean.data_ptr(),
                                               var.data_ptr(), stream),
                 op);
    return std::make_tuple(count, mean, var);
  }
  const DirfastBins bins_of_x = bins(idx, num_bins);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(dirfast_cuda_bin_stats_workspace(features_of_x, bins_of_x))},
      x.options().dtype(at::kByte));
  check_launch(dirfast_cuda_bin_stats(features_of_x, bins_of_x, count.data_ptr<int64_t>(),
                                      mean.data_ptr(), var.data_ptr(), workspace.data_ptr(),
                                      sm_count(x.device()), stream),
               op);
  return std::make_tuple(count, mean, var);
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("bin_stats", &dirfast::cuda::bin_stats_cuda);
}
