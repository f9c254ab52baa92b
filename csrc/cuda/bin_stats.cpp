// dirfast::bin_stats for CUDA tensors: checks, outputs and scratch, then the kernels of
// src/bin_stats.cu on the current stream. Nothing here waits for the GPU.
//
// With torch.use_deterministic_algorithms(True) the rows are grouped by bucket first (a stable
// sort of the indices and a searchsorted for each bucket's offset, both deterministic torch ops)
// and the deterministic kernel makes one pass per (bucket, feature) in that order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "glue.h"

namespace dirfast {
namespace cuda {
namespace {

// DIRFAST_CUDA_BIN_STATS selects candidate kernels until a GPU run decides between them and the
// defaults (benchmarks/gpu.py). Comma-separated options:
//   rows grouped by bucket: "per_row" (the default kernel) or "prefetch", with the prefetch
//   kernel's options "rows=N" (rows per warp, a multiple of 64), "vector_atomics", "tiles_first";
//   planes of pixels: "planes=direct" (the default kernel) or "planes=shared".
// e.g. "prefetch,rows=256,vector_atomics,planes=shared". Read on every call, so the GPU tests and
// benchmarks can run every variant in one process; anything else is an error naming the variable.
DirfastBinStatsTuning tuning_from_environment() {
  DirfastBinStatsTuning tuning{0, 0, 0, 0, 0};
  const char* text = std::getenv("DIRFAST_CUDA_BIN_STATS");
  if (text == nullptr) return tuning;
  const std::string options(text);
  bool per_row = false, prefetch_option = false;
  int planes_options = 0;
  size_t start = 0;
  while (start <= options.size()) {
    const size_t comma = std::min(options.find(',', start), options.size());
    const std::string option = options.substr(start, comma - start);
    start = comma + 1;
    if (option.empty()) continue;
    if (option == "per_row") {
      per_row = true;
    } else if (option == "prefetch") {
      tuning.prefetch = 1;
    } else if (option == "vector_atomics") {
      tuning.vector_atomics = 1;
      prefetch_option = true;
    } else if (option == "tiles_first") {
      tuning.tiles_first = 1;
      prefetch_option = true;
    } else if (option.rfind("rows=", 0) == 0) {
      const char* digits = option.c_str() + 5;
      char* end = nullptr;
      const long long rows = std::strtoll(digits, &end, 10);
      TORCH_CHECK(end != digits && *end == '\0' && std::isdigit(static_cast<unsigned char>(*digits)) &&
                      rows > 0 && rows % 64 == 0 && rows <= 65536,
                  "DIRFAST_CUDA_BIN_STATS: rows=N takes a positive multiple of 64 (at most 65536), got '",
                  option, "'");
      tuning.rows_per_warp = static_cast<int>(rows);
      prefetch_option = true;
    } else if (option == "planes=shared" || option == "planes=direct") {
      tuning.planes_shared = option == "planes=shared";
      ++planes_options;
    } else {
      TORCH_CHECK(false, "DIRFAST_CUDA_BIN_STATS: unknown option '", option,
                  "' (known: per_row, prefetch, rows=N, vector_atomics, tiles_first, planes=direct, "
                  "planes=shared)");
    }
  }
  TORCH_CHECK(!(per_row && tuning.prefetch),
              "DIRFAST_CUDA_BIN_STATS: per_row and prefetch name two different kernels, got '", options, "'");
  TORCH_CHECK(planes_options <= 1, "DIRFAST_CUDA_BIN_STATS: planes= given more than once, got '", options, "'");
  TORCH_CHECK(!prefetch_option || tuning.prefetch,
              "DIRFAST_CUDA_BIN_STATS: rows=N, vector_atomics and tiles_first are options of the prefetch "
              "kernel, got '", options, "'");
  return tuning;
}

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
                                      sm_count(x.device()), tuning_from_environment(), stream),
               op);
  return std::make_tuple(count, mean, var);
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("bin_stats", &dirfast::cuda::bin_stats_cuda);
}
