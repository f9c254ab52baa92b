// dirfast::smooth_bins on CPU: every column of a [B] or [B, D] table smoothed along the bins in
// one call, with the padding modes and the summation order of src/smooth.h.
//
// The arithmetic is in the dtype of stats (the window is cast to it), as the reference does, so
// float64 statistics (LDS) give the same bits as the reference and scipy. The tables are small
// (B x D); the work is split over bins, each output element computed by one thread in a fixed
// order, so the result does not depend on the thread count.
#include <algorithm>
#include <memory>
#include <string_view>

// No a * b + c is fused (g++ would where the build's baseline has FMA): the reference's bits.
#pragma GCC optimize("fp-contract=off")

#include "checks.h"
#include "parallel.h"
#include "smooth.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr const char* kOp = "dirfast::smooth_bins";

template <typename T>
DIRFAST_NOINLINE void smooth_columns(const T* stats, T* out, int64_t num_bins, int64_t columns,
                                     const T* w, const bool* symmetric, int64_t h,
                                     Padding padding) {
  // At least 2^17 window taps per thread: small tables run on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (columns * (2 * h + 1)));
  parallel_for_ranges(num_bins, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t c = 0; c < columns; ++c) {
        out[b * columns + c] = smooth_bin<T>(stats + c, columns, num_bins, b, w, symmetric, h, padding);
      }
    }
  });
}

Tensor smooth_bins_cpu(const Tensor& stats, const Tensor& window, std::string_view padding) {
  check_smooth_bins_args(stats, window, kOp, torch::headeronly::DeviceType::CPU);
  const Padding mode = parse_padding(padding, kOp);
  const int64_t h = (window.size(0) - 1) / 2;
  const Tensor w64 = contiguous_as(window, ScalarType::Double);  // scipy's symmetry test, in float64
  const double* pw64 = w64.const_data_ptr<double>();
  std::unique_ptr<bool[]> symmetric(new bool[h > 0 ? h : 1]);
  for (int64_t j = 1; j <= h; ++j) symmetric[j - 1] = window_pair_symmetric(pw64[h - j], pw64[h + j]);
  return write_like(stats, [&](const Tensor& out) {
    const Tensor src = made_contiguous(stats);
    const Tensor w = contiguous_as(window, stats.scalar_type());
    dispatch_float(stats.scalar_type(), kOp, [&](auto scalar) {
      using T = decltype(scalar);
      smooth_columns<T>(src.const_data_ptr<T>(), out.mutable_data_ptr<T>(), stats.size(0),
                        stats.dim() == 2 ? stats.size(1) : 1, w.const_data_ptr<T>(), symmetric.get(), h, mode);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("smooth_bins", TORCH_BOX(&dirfast::cpu::smooth_bins_cpu));
}
