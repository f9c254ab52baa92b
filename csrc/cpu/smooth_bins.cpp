// dirfast::smooth_bins on CPU: every column of a [B] or [B, D] table smoothed along the bins in
// one call, with the padding modes and the summation order of src/smooth.h.
//
// The arithmetic is in the dtype of stats (the window is cast to it), as dirfast.reference
// does, so float64 statistics (LDS) give the same bits as the reference and scipy. The tables
// are small (B x D); the work is split over bins with at::parallel_for, each output element
// computed by one thread in a fixed order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>

#include "plans.h"
#include "smooth.h"

namespace dirfast {
namespace cpu {
namespace {

at::Tensor smooth_bins_cpu(const at::Tensor& stats, const at::Tensor& window,
                           c10::string_view padding) {
  const SmoothBinsPlan plan = plan_smooth_bins(stats, window, padding, c10::DeviceType::CPU);
  at::Tensor result = plan.result;
  if (stats.numel() == 0) return result;
  const Padding mode = static_cast<Padding>(plan.padding);
  const int64_t num_bins = stats.size(0);
  const int64_t columns = plan.columns;
  const int64_t ks = window.size(0);
  const int64_t h = (ks - 1) / 2;
  at::Tensor out = plan.out;
  const at::Tensor& src = plan.src;
  const at::Tensor& w = plan.w;
  const double* pw64 = plan.w64.data_ptr<double>();
  std::unique_ptr<bool[]> symmetric(new bool[h > 0 ? h : 1]);
  for (int64_t j = 1; j <= h; ++j) {
    symmetric[j - 1] = window_pair_symmetric(pw64[h - j], pw64[h + j]);
  }

  const auto dtype = stats.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dirfast::smooth_bins", [&] {
    const scalar_t* ps = src.data_ptr<scalar_t>();
    const scalar_t* pw = w.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const bool* sym = symmetric.get();
    const int64_t grain = std::max<int64_t>(1, 16384 / (columns * ks));
    at::parallel_for(0, num_bins, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < columns; ++c) {
          po[b * columns + c] =
              smooth_bin<scalar_t>(ps + c, columns, num_bins, b, pw, sym, h, mode);
        }
      }
    });
  });
  if (!out.is_same(result)) result.copy_(out);
  return result;
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("smooth_bins", &dirfast::cpu::smooth_bins_cpu);
}
