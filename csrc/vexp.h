// exp, 2^x and log on a GCC float vector of any lane count, with Cephes' expf, exp2f and logf
// polynomials (about 1 ulp). What the float32 kernels that sum many exponentials use
// (mixture_logpdf, conr_loss) instead of a scalar std::exp or std::log per element; rnc_loss's
// own exp, of a wider range, takes its constants. A vector wider than the machine's registers has
// its comparisons done lane by lane by g++: use the native width.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace dirfast {

// Lanes floats (and int32s) as one GCC vector, at any alignment of the memory they come from.
template <int64_t Lanes>
struct FloatVec {
  typedef float f __attribute__((vector_size(Lanes * sizeof(float)), aligned(4)));
  typedef int32_t i __attribute__((vector_size(Lanes * sizeof(int32_t)), aligned(4)));
};

template <typename VF>
inline VF load_vec(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename VF>
inline void store_vec(float* p, VF v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lane masks (-1 where true, 0 where false) by integer arithmetic that cannot overflow, and a
// select by bit operations: g++ 12 compiles some float comparisons kept as masks, and ?: on them,
// lane by lane with a branch per lane in AVX-512 code (mixture_logpdf's forward spent most of its
// time there at small K). (A signed >> 31 gives -1 for a negative lane: g++ shifts arithmetically.)
// vminus_inf_mask: x == -inf; vnan_mask: x is NaN.
template <typename VF, typename VI>
__attribute__((always_inline)) inline VI vminus_inf_mask(VF x) {
  const VI diff = (VI)x ^ (VI)(VF{} - std::numeric_limits<float>::infinity());
  return (((diff & 0x7fffffff) - 1) >> 31) & ~(diff >> 31);  // every bit of diff 0
}

template <typename VF, typename VI>
__attribute__((always_inline)) inline VI vnan_mask(VF x) {
  return (VI{} + 0x7f800000 - ((VI)x & 0x7fffffff)) >> 31;  // magnitude bits above infinity's
}

// mask ? a : b, lane by lane, for a mask of -1 and 0 lanes.
template <typename VF, typename VI>
__attribute__((always_inline)) inline VF vselect(VI mask, VF a, VF b) {
  return (VF)((mask & (VI)a) | (~mask & (VI)b));
}

// The least argument vexp and vexp_shifted compute: below it they give about 2^-126 instead of a
// smaller number (a subnormal one or 0).
constexpr float kExpLeast = -87.3f;

// ln 2 in two parts (Cephes): kLn2Hi has 9 significant bits, so n kLn2Hi is exact for any exponent
// n here, and kLn2Lo is the rest. exp reduces its argument by them; log adds its exponent back.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;  // 1 / ln 2: x kLog2e is x's exponent of 2

// Cephes' expf polynomial, highest power first: exp(r) = 1 + r + r^2 p(r) for the reduced r.
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp on [-87.3, 88.3]; inputs below give 2^-126 instead of 0, -inf gives 0, NaN stays NaN.
// VF: the float vector type, VI: the int32 vector of the same lane count.
template <typename VF, typename VI>
__attribute__((always_inline)) inline VF vexp(VF x) {
  const VI minus_inf = x == -std::numeric_limits<float>::infinity();
  x = x < kExpLeast ? VF{} + kExpLeast : x;
  x = x > 88.3f ? VF{} + 88.3f : x;
  const VF fx = x * kLog2e + 0.5f;
  VF n = __builtin_convertvector(__builtin_convertvector(fx, VI), VF);  // floor(fx) for any sign:
  n = n > fx ? n - 1.0f : n;                                             // truncation, corrected
  x = x - n * kLn2Hi;
  x = x - n * kLn2Lo;
  VF y = VF{} + kExpPoly[0];
  y = y * x + kExpPoly[1];
  y = y * x + kExpPoly[2];
  y = y * x + kExpPoly[3];
  y = y * x + kExpPoly[4];
  y = y * x + kExpPoly[5];
  y = y * (x * x) + x + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const VF result = y * (VF)bits;  // a cast between vector types reinterprets the bits
  return minus_inf ? VF{} : result;
}

// a * b + c rounded once, lane by lane: one instruction in code compiled for FMA, libm's fmaf
// otherwise, with the same bits.
template <typename VF>
__attribute__((always_inline)) inline VF vfma(VF a, VF b, VF c) {
  VF r;
#pragma GCC unroll 16
  for (int l = 0; l < static_cast<int>(sizeof(VF) / sizeof(float)); ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return r;
}

// 1.5 * 2^23: for |x| < 2^22, x + kRoundWhole holds x rounded to a whole number n (to even on ties)
// in its low mantissa bits, (bits of the sum) - kRoundWholeBits = n; what vexp_shifted and vexp2
// round their exponents by.
constexpr float kRoundWhole = 12582912.0f;
constexpr int32_t kRoundWholeBits = 0x4b400000;

// exp of a log-sum-exp term after its max shift (x <= 0, or a little above by rounding, or NaN),
// with vexp's polynomial evaluated by fused multiply-adds: inputs below -87.3 (-inf included)
// give at least 2^-126 instead of 0, which a sum that has the max term's 1 in it does not feel;
// NaN stays NaN. n is rounded to nearest by adding kRoundWhole.
template <typename VF, typename VI>
__attribute__((always_inline)) inline VF vexp_shifted(VF x) {
  const VF k = VF{};
  x = x < kExpLeast ? k + kExpLeast : x;
  const VF shifted = vfma(x, k + kLog2e, k + kRoundWhole);
  const VF n = shifted - kRoundWhole;
  x = vfma(n, k - kLn2Hi, x);
  x = vfma(n, k - kLn2Lo, x);
  VF y = vfma(k + kExpPoly[0], x, k + kExpPoly[1]);
  y = vfma(y, x, k + kExpPoly[2]);
  y = vfma(y, x, k + kExpPoly[3]);
  y = vfma(y, x, k + kExpPoly[4]);
  y = vfma(y, x, k + kExpPoly[5]);
  y = vfma(y, x * x, x) + 1.0f;  // in [0.7, 1.5), at least 1 where n = -126: y 2^n is normal
  const VI pow2 = ((VI)shifted - (kRoundWholeBits - 127)) << 23;
  return y * (VF)pow2;
}

// Cephes' exp2f polynomial: 2^f for f in [-1/2, 1/2] as 1 + f (c0 + f (c1 + ... f c5)) by fused
// multiply-adds, c5 first (exactly 1 at 0).
constexpr float kExp2Poly[6] = {6.931472028550421e-1f, 2.402264791363012e-1f, 5.550332471162809e-2f,
                                9.618437357674640e-3f, 1.339887440266574e-3f, 1.535336188319500e-4f};

// vexp2's least exponent: 2^t stays a normal number.
constexpr float kExp2Least = -126.0f;

// 2^t for t <= 0 (-inf and NaN included) as p(f) 2^n, n = t rounded to nearest (even on ties)
// and f = t - n, both exact, with t below -126 taken as -126: at least 2^-126, a normal number (a
// subnormal result costs Intel cores a microcode assist per instruction), NaN for NaN: within 0.95
// ulp of 2^t for every float t in [-126, 0] (benchmarks/results/cpu/mixture-one-pass-xeon.md).
// The same bits as AVX-512's scalef(p(reduce(t)), t - reduce(t)) on max(-126, t) in
// mixture_logpdf.cpp.
template <typename VF, typename VI>
__attribute__((always_inline)) inline VF vexp2(VF t) {
  const VF k = VF{};
  t = t < kExp2Least ? k + kExp2Least : t;  // NaN stays NaN (the comparison is false)
  const VF shifted = t + kRoundWhole;
  const VF f = t - (shifted - kRoundWhole);
  VF p = vfma(k + kExp2Poly[5], f, k + kExp2Poly[4]);
#pragma GCC unroll 4
  for (int i = 3; i >= 0; --i) p = vfma(p, f, k + kExp2Poly[i]);
  p = vfma(p, f, k + 1.0f);
  return p * (VF)(((VI)shifted - (kRoundWholeBits - 127)) << 23);
}

// Cephes' logf polynomial, highest power first, and its split of x = 2^e m: m's mantissa bits
// with the exponent bits of 0.5 (m in [0.5, 1)), taken times 2 below sqrt(1/2) (vlog_normal and
// mixture_logpdf's AVX-512 and AVX2 logs).
constexpr float kLogPoly[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                               -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                               2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr int32_t kMantissaMask = 0x007fffff;
constexpr int32_t kHalfExponentBits = 0x3f000000;
constexpr float kSqrtHalf = 0.707106781186547524f;

// log of positive normal numbers (and NaN, which stays NaN): Cephes' logf by fused
// multiply-adds, x = 2^e m with m in [sqrt(1/2), sqrt(2)).
template <typename VF, typename VI>
__attribute__((always_inline)) inline VF vlog_normal(VF x) {
  const VF k = VF{};
  const VI bits = (VI)x;
  VI e = (bits >> 23) - 126;                         // x = 2^e m, m in [0.5, 1)
  VF m = (VF)((bits & kMantissaMask) | kHalfExponentBits);
  const VI small = m < kSqrtHalf;
  e = e + small;                                     // (a true comparison is -1)
  m = m - 1.0f + (small ? m : k);
  const VF z = m * m;
  VF y = vfma(k + kLogPoly[0], m, k + kLogPoly[1]);
#pragma GCC unroll 7
  for (int i = 2; i < 9; ++i) y = vfma(y, m, k + kLogPoly[i]);
  y = y * m * z;
  const VF fe = __builtin_convertvector(e, VF);
  y = vfma(fe, k + kLn2Lo, y);
  y = vfma(k - 0.5f, z, y);
  const VF result = vfma(fe, k + kLn2Hi, m + y);
  return x == x ? result : x;
}

}  // namespace dirfast
