// Smoothing of per-bin statistics along the bin axis with a window (LDS and FDS).
//
// Torch-free and header-only, shared by the CPU kernel (csrc/cpu/smooth_bins.cpp) and the CUDA
// kernel (csrc/cuda/smooth_bins.cu). For bins 0..B-1 and an odd window w of length ks = 2h + 1
// (cross-correlation, as F.conv1d; the DIR windows are symmetric, so it is also scipy's
// convolution): out[b] = sum_k w[k] * stats[b + k - h], an index outside [0, B) resolved by the
// padding. The taps are summed in the order of the reference (dirfast.ops.smooth_bins) and scipy.ndimage,
// so the results are the same bits in the same dtype: LDS depends on that for an integer
// truncation quirk of the published code.
#pragma once

#include "macros.h"

#include <cstdint>

namespace dirfast {

// The padding modes, numbered as in dirfast.ops._common.PADDINGS (the Triton kernel's numbers); kPaddingNames[mode] is the name the op's `padding` argument takes.
enum class Padding : int { kReflect = 0, kReplicate = 1, kConstant = 2, kSymmetric = 3 };
constexpr const char* kPaddingNames[] = {"reflect", "replicate", "constant", "symmetric"};
constexpr int kNumPaddings = 4;

// scipy.ndimage's symmetry test of a pair of window taps, in float64.
DIRFAST_HOST_DEVICE inline bool window_pair_symmetric(double left, double right) {
  const double diff = left > right ? left - right : right - left;
  return diff <= 2.220446049250313e-16;  // 2^-52
}

// The bin a tap at index j reads, or -1 for a zero tap (constant padding):
//   reflect    mirror without repeating the edge (torch F.pad "reflect"), applied as often as
//              needed when h >= B: period 2(B - 1); for B == 1 every index is 0;
//   symmetric  mirror repeating the edge (scipy.ndimage "reflect"): period 2B;
//   replicate  clamp to the edge;
//   constant   the tap reads 0 (scipy.ndimage.convolve1d mode="constant").
DIRFAST_HOST_DEVICE inline int64_t padded_index(int64_t j, int64_t num_bins, Padding padding) {
  if (j >= 0 && j < num_bins) return j;
  switch (padding) {
    case Padding::kReflect: {
      if (num_bins == 1) return 0;
      const int64_t period = 2 * (num_bins - 1);
      int64_t r = j % period;
      if (r < 0) r += period;
      return r >= num_bins ? period - r : r;
    }
    case Padding::kSymmetric: {
      const int64_t period = 2 * num_bins;
      int64_t r = j % period;
      if (r < 0) r += period;
      return r >= num_bins ? period - 1 - r : r;
    }
    case Padding::kReplicate:
      return j < 0 ? 0 : num_bins - 1;
    case Padding::kConstant:
    default:
      return -1;
  }
}

// out[b] of one column: stats[i * stride] is bin i; w holds the ks = 2h + 1 weights in T, and
// symmetric(j) (j = 1..h) says whether the pair (w[h - j], w[h + j]) passes scipy's symmetry test
// (a lookup table on the CPU, computed from a float64 copy of the window on the GPU). The order:
//   out = stats[b] * w[h];
//   for j = h, ..., 1:
//     out += symmetric(j) ? (left + right) * w[h + j] : left * w[h - j] + right * w[h + j]
// where left/right are the taps at b - j and b + j, and symmetric(j) says whether w[h - j] and
// w[h + j] differ by at most 2^-52 in float64 (scipy's test). Every operation rounds to T, the
// stats dtype (c10::Half and c10::BFloat16 arithmetic rounds after each operation too).
template <typename T, typename Symmetric>
DIRFAST_HOST_DEVICE inline T smooth_bin_with(const T* stats, int64_t stride, int64_t num_bins,
                                             int64_t b, const T* w, Symmetric symmetric, int64_t h,
                                             Padding padding) {
  auto tap = [&](int64_t j) -> T {
    const int64_t i = padded_index(j, num_bins, padding);
    return i < 0 ? T(0) : stats[i * stride];
  };
  T out = stats[b * stride] * w[h];
  for (int64_t j = h; j >= 1; --j) {
    const T left = tap(b - j);
    const T right = tap(b + j);
    const T term = symmetric(j) ? T((left + right) * w[h + j])
                                : T(T(left * w[h - j]) + T(right * w[h + j]));
    out = out + term;
  }
  return out;
}

// The same with the symmetry tests in a table: symmetric[j - 1] for the pair at distance j.
template <typename T>
DIRFAST_HOST_DEVICE inline T smooth_bin(const T* stats, int64_t stride, int64_t num_bins,
                                        int64_t b, const T* w, const bool* symmetric, int64_t h,
                                        Padding padding) {
  return smooth_bin_with(stats, stride, num_bins, b, w,
                         [symmetric](int64_t j) { return symmetric[j - 1]; }, h, padding);
}

}  // namespace dirfast
