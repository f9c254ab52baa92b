// The FDS calibration as a per-bucket affine map: calibrate(x) = x * s + t.
//
// Torch-free and header-only, shared by the CPU kernel (csrc/cpu/calibrate.cpp) and the CUDA
// kernels. For a bucket with statistics (m1, v1) to whiten with and (m2, v2) to re-colour with:
//
//   s = sqrt(clamp(v2 / v1, clip_min, clip_max)),   t = m2 - m1 * s,
//
// so (x - m1) * s + m2 == x * s + t up to rounding. The published zero-variance rules leave
// values unchanged (s = 1, t = -0.0: x * 1 + -0.0 is x exactly, the sign of a zero included):
//   * every dimension of a bucket whose v1 sums below 1e-10;
//   * each dimension where v1 == 0.
// The arithmetic order is that of dirfast.reference.scale_shift (divide, clamp, sqrt, then
// m2 - m1 * s). The results agree with it up to the rounding of the square root: std::sqrt is
// correctly rounded, torch's vectorised CPU sqrt is not always (1 ulp on some inputs).
#pragma once

#include "macros.h"

#include <cmath>
#include <cstdint>

namespace dirfast {

// The threshold of the published rule: a bucket whose v1 sums below it is left alone.
constexpr double kCalibrateMinVarianceSum = 1e-10;

// clamp that lets NaN through, like torch.clamp.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t clamp_nan(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Whether a bucket is left alone as a whole: sum(v1) < 1e-10 (summed in order, in acc_t).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline bool calibrate_bucket_unchanged(const acc_t* v1, int64_t dim) {
  acc_t sum = acc_t(0);
  for (int64_t d = 0; d < dim; ++d) sum += v1[d];
  return sum < static_cast<acc_t>(kCalibrateMinVarianceSum);
}

// s and t of one dimension of a bucket that is not left alone as a whole (v1 == 0: unchanged).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void calibrate_scale_shift(acc_t m1, acc_t v1, acc_t m2, acc_t v2,
                                                      acc_t clip_min, acc_t clip_max, acc_t& s,
                                                      acc_t& t) {
  const bool unchanged = v1 == acc_t(0);
  const acc_t ratio = v2 / (unchanged ? acc_t(1) : v1);
  const acc_t root = std::sqrt(clamp_nan<acc_t>(ratio, clip_min, clip_max));
  const acc_t shift = m2 - m1 * root;
  s = unchanged ? acc_t(1) : root;
  t = unchanged ? -acc_t(0) : shift;
}

// s and t of every dimension of one bucket (rows of D values); s and t may have any stride, so
// a kernel can store them bucket-major ([B, D]) or feature-major ([D, B]).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void calibrate_bucket(const acc_t* m1, const acc_t* v1, const acc_t* m2,
                                                 const acc_t* v2, int64_t dim, acc_t clip_min,
                                                 acc_t clip_max, acc_t* s, acc_t* t,
                                                 int64_t out_stride) {
  if (calibrate_bucket_unchanged(v1, dim)) {
    for (int64_t d = 0; d < dim; ++d) {
      s[d * out_stride] = acc_t(1);
      t[d * out_stride] = -acc_t(0);
    }
    return;
  }
  for (int64_t d = 0; d < dim; ++d) {
    calibrate_scale_shift(m1[d], v1[d], m2[d], v2[d], clip_min, clip_max, s[d * out_stride],
                          t[d * out_stride]);
  }
}

// The map itself, on a value already converted to acc_t.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t calibrate_apply(acc_t x, acc_t s, acc_t t) {
  return x * s + t;
}

}  // namespace dirfast
