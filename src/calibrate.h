// The FDS calibration as a per-bucket affine map: calibrate(x) = x * s + t.
//
// Torch-free and header-only, shared by the CPU kernel (csrc/cpu/calibrate.cpp) and the CUDA
// kernel (csrc/cuda/calibrate.cu). For a bucket with statistics (src_mean, src_var) to whiten with and
// (dst_mean, dst_var) to re-colour with:
//
//   s = sqrt(clamp(dst_var / src_var, clip_min, clip_max)),   t = dst_mean - src_mean * s,
//
// so (x - src_mean) * s + dst_mean == x * s + t up to rounding; the published zero-variance
// rules leave some values unchanged (s = 1, t = -0.0: x * 1 + -0.0 is x exactly, the sign of a
// zero included): every dimension of a bucket whose src_var sums below
// kCalibrateMinVarianceSum, and each dimension where src_var == 0 (calibrate_scale_shift).
#pragma once

#include "macros.h"

#include <cmath>
#include <cstdint>

namespace dirfast {

// The threshold of the published rule: a bucket whose src_var sums below it is left alone.
constexpr double kCalibrateMinVarianceSum = 1e-10;

// clamp that lets NaN through, like torch.clamp.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t clamp_nan(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// s and t of one dimension of a bucket that is not left alone as a whole (src_var == 0:
// unchanged). The arithmetic order is that of dirfast.ops.calibrate.scale_shift (divide, clamp, sqrt,
// then dst_mean - src_mean * s). The results agree with it up to the rounding of the square root:
// std::sqrt is correctly rounded, torch's vectorised CPU sqrt is not always (1 ulp on some inputs).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void calibrate_scale_shift(acc_t src_mean, acc_t src_var,
                                                      acc_t dst_mean, acc_t dst_var,
                                                      acc_t clip_min, acc_t clip_max, acc_t& s,
                                                      acc_t& t) {
  const bool unchanged = src_var == acc_t(0);
  const acc_t ratio = dst_var / (unchanged ? acc_t(1) : src_var);
  const acc_t root = std::sqrt(clamp_nan<acc_t>(ratio, clip_min, clip_max));
  const acc_t shift = dst_mean - src_mean * root;
  s = unchanged ? acc_t(1) : root;
  t = unchanged ? -acc_t(0) : shift;
}

// The map itself, on a value already converted to acc_t.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t calibrate_apply(acc_t x, acc_t s, acc_t t) {
  return x * s + t;
}

}  // namespace dirfast
