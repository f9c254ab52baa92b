// The FDS calibration as a per-bucket affine map: calibrate(x) = x * s + t.
//
// Torch-free and header-only, shared by the CPU kernel (csrc/cpu/calibrate.cpp) and the CUDA
// kernel (csrc/cuda/calibrate.cu). For a bucket with statistics (src_mean, src_var) to whiten with and
// (dst_mean, dst_var) to re-colour with:
//
//   s = sqrt(clamp(dst_var / src_var, clip_min, clip_max)),   t = dst_mean - src_mean * s,
//
// so (x - src_mean) * s + dst_mean == x * s + t up to rounding; the published zero-variance
// rules leave some values unchanged (calibrate_bucket).
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

// Whether a bucket is left alone as a whole: sum(src_var) < 1e-10 (summed in order, in acc_t).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline bool calibrate_bucket_unchanged(const acc_t* src_var, int64_t dim) {
  acc_t sum = acc_t(0);
  for (int64_t d = 0; d < dim; ++d) sum += src_var[d];
  return sum < static_cast<acc_t>(kCalibrateMinVarianceSum);
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

// s and t of every dimension of one bucket (rows of D values); s and t may have any stride, so
// a kernel can store them bucket-major ([B, D]) or feature-major ([D, B]). The published
// zero-variance rules leave values unchanged (s = 1, t = -0.0: x * 1 + -0.0 is x exactly, the
// sign of a zero included) in every dimension of a bucket whose src_var sums below 1e-10, and in
// each dimension where src_var == 0.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void calibrate_bucket(const acc_t* src_mean, const acc_t* src_var,
                                                 const acc_t* dst_mean, const acc_t* dst_var,
                                                 int64_t dim, acc_t clip_min, acc_t clip_max,
                                                 acc_t* s, acc_t* t, int64_t out_stride) {
  if (calibrate_bucket_unchanged(src_var, dim)) {
    for (int64_t d = 0; d < dim; ++d) {
      s[d * out_stride] = acc_t(1);
      t[d * out_stride] = -acc_t(0);
    }
    return;
  }
  for (int64_t d = 0; d < dim; ++d) {
    calibrate_scale_shift(src_mean[d], src_var[d], dst_mean[d], dst_var[d], clip_min, clip_max,
                          s[d * out_stride], t[d * out_stride]);
  }
}

// The map itself, on a value already converted to acc_t.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t calibrate_apply(acc_t x, acc_t s, acc_t t) {
  return x * s + t;
}

}  // namespace dirfast
