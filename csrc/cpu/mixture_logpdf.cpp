// dirfast::mixture_logpdf on CPU: out = log sum_k w_k N(x; m_k, v_k) + log(2 pi) / 2 for every
// element, and its backward, without an [N, K] matrix.
//
// With s_k = 1 / sqrt(v_k) and c_k = log w_k + log s_k, z = (x - m_k) s_k, term_k(x) = c_k - z^2 / 2
// and out = max_k term + log sum_k exp(term_k - max) (the reference's formulation: a subnormal
// variance keeps a finite s_k). A component with invalid parameters gets c_k = NaN, so every
// output is NaN (dirfast.ops.mixture_logpdf documents the rule). The float32 forward computes a
// vector of elements at a time with polynomial exp (2^x in one pass) and log (vexp.h, about
// 1 ulp, by explicit fused multiply-adds) in the machine's vector width: AVX-512 (+ DQ), AVX2 + FMA
// or the baseline (libm's fmaf there), chosen at run time, with the same bits, in one pass over
// the components (ShiftedTerms) and in two for the elements that need them. The float64 forward
// uses plain loops and std::exp. The backward takes elements kLanes at a time (converted to the
// arithmetic type in a small buffer; in float32 as kLanes / W vectors of the machine's width W, by
// fused multiply-adds and vexp_shifted: the same bits for every width), recomputes each element's
// responsibilities, the softmax of its terms (out says only where the density is 0), and sums the
// component gradients per fixed chunk of elements, the chunks then added in order: the same bits
// for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// No a * b + c is fused but by vfma (g++ would fuse others in the AVX2 + FMA and AVX-512 code):
// every vector width rounds alike (above the project's headers: theirs too).
#pragma GCC optimize("fp-contract=off")

#include "checks.h"
#include "parallel.h"
#include "test_hooks.h"
#include "vexp.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;          // elements computed together by the backward and in float64
constexpr int64_t kChunk = int64_t(1) << 14;  // elements per task: fixed, so results do not depend on threads

// Float32 code for AVX-512, AVX2 + FMA and the baseline, chosen at run time (x86-64 with g++).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
#define DIRFAST_MIXTURE_ISAS 1
#else
#define DIRFAST_MIXTURE_ISAS 0
#endif
#if DIRFAST_MIXTURE_ISAS
#include <immintrin.h>
#endif

constexpr int64_t kBufferedBytes = 16 << 10;  // float32 forward: terms kept from the max pass per vector
constexpr int64_t kGrainExps = int64_t(1) << 17;  // the least exponentials a thread is given

// The components in the arithmetic type: means m, inverse standard deviations s = 1 / sqrt(v),
// and c = log w + log s; c is NaN for a component whose parameters are invalid (a mean that is
// not finite; a variance that is NaN, not positive or infinite; a log-weight that is NaN or +inf).
template <typename acc_t>
struct Components {
  std::vector<acc_t> m, s, c;
  Components(const Tensor& means, const Tensor& variances, const Tensor& log_weights, ScalarType acc) {
    const Tensor mt = contiguous_as(means, acc);
    const Tensor vt = contiguous_as(variances, acc);
    const Tensor wt = contiguous_as(log_weights, acc);
    init(mt.const_data_ptr<acc_t>(), vt.const_data_ptr<acc_t>(), wt.const_data_ptr<acc_t>(), mt.numel());
  }
  Components(const acc_t* means, const acc_t* variances, const acc_t* log_weights, int64_t k) {
    init(means, variances, log_weights, k);
  }
  void init(const acc_t* pm, const acc_t* pv, const acc_t* pw, int64_t k) {
    m.assign(pm, pm + k);
    s.resize(k);
    c.resize(k);
    for (int64_t i = 0; i < k; ++i) {
      const acc_t v = pv[i], w = pw[i];
      const bool valid = std::isfinite(pm[i]) && v > 0 && std::isfinite(v) && !std::isnan(w) &&
                         w != std::numeric_limits<acc_t>::infinity();
      const acc_t root = std::sqrt(v);
      s[i] = acc_t(1) / root;
      c[i] = valid ? w - std::log(root) : std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
  int64_t size() const { return static_cast<int64_t>(m.size()); }
};

// One component's term of a vector of elements, shifted by their max (arg = term - max <= 0 but for
// rounding), added to the sum of exponentials e and, with kGrads, to the sums of e z s and of
// e (z^2 - 1) s^2 / 2, where arg is -87.3 or more: below, vexp_shifted's 2^-126 is not e, and 2^-126
// z s is not small where the variance is tiny (it made gx 10-20 off a subnormal variance's mean);
// the true e adds nothing float32 sees, and an e of 0 nothing at all (not 0 * inf).
template <int W, bool kGrads>
__attribute__((always_inline)) inline void add_term(typename FloatVec<W>::f arg, typename FloatVec<W>::f z, float s,
                                                    typename FloatVec<W>::f& sum, typename FloatVec<W>::f& along_x,
                                                    typename FloatVec<W>::f& along_v) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  if constexpr (kGrads) {
    const vf e = vexp_shifted<vf, vi>(arg);
    const vi zero = arg < kExpLeast;
    sum += e;
    along_x += zero ? vf{} : e * z * s;
    along_v += zero ? vf{} : e * vfma(z, z, vf{} - 1.0f) * (0.5f * s * s);
  } else {
    sum += vexp_shifted<vf, vi>(arg);
  }
}

// out[t] for the W float32 values xs[t] (one native vector): -inf where every term is -inf
// (density 0), NaN where a term or x is NaN. The max term's exponential is 1, so the sum is at least
// 1 except where there is no max (every term -inf or NaN). kGrads: also gx[t] = -sum_k e_k z s_k /
// sum and gv[t] = sum_k e_k (z^2 - 1) s_k^2 / 2 / sum from the same exponentials e_k (the backward's
// gradient in x and its variance gradients summed over the components, for an upstream gradient of
// 1); both 0 where the density is 0.
template <int W, bool kGrads>
__attribute__((always_inline)) inline void forward_vector(const float* xs_in, float* out, float* gx, float* gv,
                                                          const float* m, const float* s, const float* c, int64_t k) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  constexpr float inf = std::numeric_limits<float>::infinity();
  const vf xs = load_vec<vf>(xs_in);
  constexpr int64_t kBuffered = kBufferedBytes / sizeof(vf);
  vf terms[kBuffered];  // the first terms, for the second pass
  const int64_t buffered = std::min(k, kBuffered);
  vf top = vf{} - inf;
  for (int64_t j = 0; j < k; ++j) {
    const vf z = (xs - m[j]) * s[j];
    const vf term = vfma(-0.5f * z, z, vf{} + c[j]);
    if (j < buffered) terms[j] = term;
    top = term > top ? term : top;
  }
  // The masks by vexp.h's integer arithmetic (g++ 12 compiled this function's comparisons kept as
  // masks lane by lane, with a branch per lane, for AVX-512).
  const vi none = vminus_inf_mask<vf, vi>(top);  // no max: every term -inf or NaN
  const vf shift = vselect(none, vf{}, top);
  vf sum = vf{}, along_x = vf{}, along_v = vf{};
  for (int64_t j = 0; j < buffered; ++j) {
    // z is recomputed only where it is used (kGrads); the plain forward's loop stays exp and add
    add_term<W, kGrads>(terms[j] - shift, kGrads ? (xs - m[j]) * s[j] : vf{}, s[j], sum, along_x, along_v);
  }
  for (int64_t j = buffered; j < k; ++j) {
    const vf z = (xs - m[j]) * s[j];
    add_term<W, kGrads>(vfma(-0.5f * z, z, vf{} + c[j]) - shift, z, s[j], sum, along_x, along_v);
  }
  const vi empty = none & ~vnan_mask<vf, vi>(sum);  // density 0
  store_vec(out, vselect(empty, vf{} - inf, shift + vlog_normal<vf, vi>(sum)));
  if constexpr (kGrads) {
    store_vec(gx, vselect(empty, vf{}, (vf{} - along_x) / sum));
    store_vec(gv, vselect(empty, vf{}, along_v / sum));
  }
}

// Elements [begin, end) of x, W at a time (a partial last vector through a buffer whose slots past
// the end repeat the last value, computed and dropped). kGrads: also gx and gv, as forward_vector.
template <int W, bool kGrads>
__attribute__((always_inline)) inline void forward_range(const float* px, float* po, float* pgx, float* pgv,
                                                         int64_t begin, int64_t end, const float* m, const float* s,
                                                         const float* c, int64_t k) {
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    forward_vector<W, kGrads>(px + i, po + i, kGrads ? pgx + i : nullptr, kGrads ? pgv + i : nullptr, m, s, c, k);
  }
  if (i < end) {
    const int64_t n = end - i;
    float xs[W], lanes[3][W];
    for (int64_t t = 0; t < W; ++t) xs[t] = px[i + std::min(t, n - 1)];
    forward_vector<W, kGrads>(xs, lanes[0], lanes[1], lanes[2], m, s, c, k);
    std::copy(lanes[0], lanes[0] + n, po + i);
    if constexpr (kGrads) {
      std::copy(lanes[1], lanes[1] + n, pgx + i);
      std::copy(lanes[2], lanes[2] + n, pgv + i);
    }
  }
}

#if DIRFAST_MIXTURE_ISAS
template <bool kGrads>
__attribute__((target("avx512f"))) DIRFAST_NOINLINE void forward_range_avx512(const float* px, float* po, float* pgx,
                                                                               float* pgv, int64_t begin, int64_t end,
                                                                               const float* m, const float* s,
                                                                               const float* c, int64_t k) {
  forward_range<16, kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
}

template <bool kGrads>
__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE void forward_range_avx2(const float* px, float* po, float* pgx,
                                                                              float* pgv, int64_t begin, int64_t end,
                                                                              const float* m, const float* s,
                                                                              const float* c, int64_t k) {
  forward_range<8, kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
}
#endif

template <bool kGrads>
DIRFAST_NOINLINE void forward_range_baseline(const float* px, float* po, float* pgx, float* pgv, int64_t begin,
                                             int64_t end, const float* m, const float* s, const float* c, int64_t k) {
  forward_range<4, kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
}

// The widest of the three the machine has (16, 8 or 4 float32 lanes).
inline int float_lanes() {
#if DIRFAST_MIXTURE_ISAS
  static const int lanes = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) ? 16
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 8
                                                                                               : 4;
  return lanes;
#else
  return 4;
#endif
}

// The float32 forward in one pass over the components: every term shifted by top = max_k c_k
// instead of the element's largest term (term_k <= c_k: no exponential overflows), so there is no
// max pass. In log2 units, t_k = d_k - u^2 with d_k = (c_k - top) log2(e) <= 0 and
// u = (x - m_k) a_k, a_k = s_k sqrt(log2(e) / 2): 2^t_k = exp(term_k - top), out = top + log sum_k
// 2^t_k (vexp2: terms below 2^-126 count as 2^-126 to 2^-125). Components of weight 0 (c_k = -inf)
// are left out. An element whose sum is below kLeastSum (its largest term over 44 nats below top,
// or x not finite) or NaN is computed again in two passes (forward_vector); from kLeastSum up, the
// terms raised to 2^-126 change the sum by less than float32 sees, for any K below 2^36. With
// gradients, also gx = -sum_k e_k z s_k / sum and gv = sum_k e_k ((z s_k)^2 - s_k^2) / 2 / sum
// (forward_vector's), over the terms whose t_k is -126 or more (the raised ones add nothing).
constexpr float kLeastSum = 0x1p-64f;

struct ShiftedTerms {
  std::vector<float> m, a, d;  // the components of c_k > -inf
  std::vector<float> q, s2;    // with gradients: z s = u q_k, q_k = s_k sqrt(2 / log2(e)); s_k^2
  float top = 0;

  // None where a c_k is NaN (every output is NaN) or none is finite: the two passes do those.
  static std::optional<ShiftedTerms> of(const Components<float>& comp) {
    constexpr double log2e = 1.4426950408889634;
    const double half_log2e_root = std::sqrt(log2e / 2);
    double largest = -std::numeric_limits<double>::infinity();
    for (float c : comp.c) {
      if (std::isnan(c)) return std::nullopt;
      largest = std::max<double>(largest, c);
    }
    if (largest == -std::numeric_limits<double>::infinity()) return std::nullopt;
    ShiftedTerms st;
    st.top = static_cast<float>(largest);
    for (int64_t j = 0; j < comp.size(); ++j) {
      if (comp.c[j] == -std::numeric_limits<float>::infinity()) continue;
      st.m.push_back(comp.m[j]);
      st.a.push_back(static_cast<float>(comp.s[j] * half_log2e_root));
      st.d.push_back(static_cast<float>((double(comp.c[j]) - st.top) * log2e));
      st.q.push_back(static_cast<float>(comp.s[j] / half_log2e_root));
      st.s2.push_back(static_cast<float>(double(comp.s[j]) * comp.s[j]));
    }
    return st;
  }
  int64_t size() const { return static_cast<int64_t>(m.size()); }
};

// One pass over full vectors: out (kGrads: and gx, gv) for the W-lane vectors x[0, vectors W), out
// NaN in every lane whose sum is below kLeastSum or NaN (left to the two passes); bit v of the
// result set where vector v has such a lane (vectors <= 64). The baseline's in generic code
// (vexp2, vlog_normal); AVX2's and AVX-512's in intrinsics with the same bits (g++ 12 compiled the
// generic code's fused multiply-adds lane by lane in them).
template <int W, bool kGrads>
__attribute__((always_inline)) inline uint64_t one_pass_vectors(const float* x, float* out, float* gx, float* gv,
                                                                int64_t vectors, const ShiftedTerms& st) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  uint64_t redo = 0;
  for (int64_t v = 0; v < vectors; ++v) {
    const vf xs = load_vec<vf>(x + v * W);
    vf sum = vf{}, along_x = vf{}, along_v = vf{};
    for (int64_t j = 0; j < st.size(); ++j) {
      const vf u = (xs - st.m[j]) * st.a[j];
      const vf t = vfma(vf{} - u, u, vf{} + st.d[j]);
      const vf e = vexp2<vf, vi>(t);
      sum += e;
      if constexpr (kGrads) {
        const vi counted = t >= kExp2Least;
        const vf zs = u * st.q[j];
        along_x = vselect(counted, vfma(e, zs, along_x), along_x);
        along_v = vselect(counted, vfma(e, vfma(zs, zs, vf{} - st.s2[j]), along_v), along_v);
      }
    }
    const vi kept = sum >= kLeastSum;  // false for NaN
    store_vec(out + v * W, vselect(kept, st.top + vlog_normal<vf, vi>(sum),
                                   vf{} + std::numeric_limits<float>::quiet_NaN()));
    if constexpr (kGrads) {
      store_vec(gx + v * W, (vf{} - along_x) / sum);
      store_vec(gv + v * W, along_v * 0.5f / sum);
    }
    for (int l = 0; l < W; ++l) redo |= uint64_t(kept[l] == 0) << v;
  }
  return redo;
}

template <bool kGrads>
DIRFAST_NOINLINE uint64_t one_pass_baseline(const float* x, float* out, float* gx, float* gv, int64_t vectors,
                                            const ShiftedTerms& st) {
  return one_pass_vectors<4, kGrads>(x, out, gx, gv, vectors, st);
}

#if DIRFAST_MIXTURE_ISAS
// (g++ 12 warns that the unmasked AVX-512 intrinsics' undefined source register "may be used
// uninitialized")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// vexp.h's vlog_normal in AVX-512 intrinsics, for positive normal x (the kept sums).
__attribute__((target("avx512f,avx512dq"), always_inline)) inline __m512 vlog_normal_avx512(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512i e = _mm512_sub_epi32(_mm512_srai_epi32(bits, 23), _mm512_set1_epi32(126));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(kMantissaMask)), _mm512_set1_epi32(kHalfExponentBits)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(1));
  const __m512 less = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  m = _mm512_mask_add_ps(less, small, less, m);
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(kLogPoly[0]), m, _mm512_set1_ps(kLogPoly[1]));
  for (int i = 2; i < 9; ++i) y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(kLogPoly[i]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
  const __m512 fe = _mm512_cvtepi32_ps(e);
  y = _mm512_fmadd_ps(fe, _mm512_set1_ps(kLn2Lo), y);
  y = _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, y);
  return _mm512_fmadd_ps(fe, _mm512_set1_ps(kLn2Hi), _mm512_add_ps(m, y));
}

// sum_k 2^t_k of the V vectors at x into sums (kGrads: and the gradient sums into gx, gv), their
// terms interleaved (two chains of dependent steps instead of one: faster than one vector at a
// time, benchmarks/results/cpu/mixture-one-pass-xeon.md). 2^t as vexp2 (its max(-126, t) first) by
// scalef(p(f), n), f by one reduce (AVX-512 DQ).
template <int V, bool kGrads>
__attribute__((target("avx512f,avx512dq"), always_inline)) inline void sums_avx512(const float* x, float* sums,
                                                                                   float* gx, float* gv,
                                                                                   const ShiftedTerms& st) {
  __m512 poly[6];
  for (int i = 0; i < 6; ++i) poly[i] = _mm512_set1_ps(kExp2Poly[i]);
  const __m512 one = _mm512_set1_ps(1.0f), least = _mm512_set1_ps(kExp2Least);
  __m512 xs[V], sum[V], along_x[V], along_v[V];
  for (int v = 0; v < V; ++v) {
    xs[v] = _mm512_loadu_ps(x + v * 16);
    sum[v] = along_x[v] = along_v[v] = _mm512_setzero_ps();
  }
  const float *m = st.m.data(), *a = st.a.data(), *d = st.d.data(), *q = st.q.data(), *s2 = st.s2.data();
  for (int64_t j = 0; j < st.size(); ++j) {
    const __m512 mj = _mm512_set1_ps(m[j]), aj = _mm512_set1_ps(a[j]), dj = _mm512_set1_ps(d[j]);
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __m512 u = _mm512_mul_ps(_mm512_sub_ps(xs[v], mj), aj);
      const __m512 raw = _mm512_fnmadd_ps(u, u, dj);
      const __m512 t = _mm512_max_ps(least, raw);  // NaN stays
      // f = t - n and n = t - f, n = t rounded to nearest: both exact (reduce toward -inf would round
      // its f = 1 + t for a t just below 0, otherwise than a subtraction does)
      const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 p = _mm512_fmadd_ps(poly[5], f, poly[4]);
      for (int r = 3; r >= 0; --r) p = _mm512_fmadd_ps(p, f, poly[r]);
      p = _mm512_fmadd_ps(p, f, one);
      const __m512 e = _mm512_scalef_ps(p, _mm512_sub_ps(t, f));  // p 2^n
      sum[v] = _mm512_add_ps(sum[v], e);
      if constexpr (kGrads) {
        const __mmask16 counted = _mm512_cmp_ps_mask(raw, least, _CMP_GE_OQ);
        const __m512 zs = _mm512_mul_ps(u, _mm512_set1_ps(q[j]));
        along_x[v] = _mm512_mask3_fmadd_ps(e, zs, along_x[v], counted);
        along_v[v] = _mm512_mask3_fmadd_ps(e, _mm512_fmsub_ps(zs, zs, _mm512_set1_ps(s2[j])), along_v[v], counted);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(sums + v * 16, sum[v]);
    if constexpr (kGrads) {
      _mm512_storeu_ps(gx + v * 16, along_x[v]);
      _mm512_storeu_ps(gv + v * 16, along_v[v]);
    }
  }
}

// The sums two vectors at a time, then their logs (independent of one another, so they overlap).
template <bool kGrads>
__attribute__((target("avx512f,avx512dq"))) DIRFAST_NOINLINE uint64_t one_pass_avx512(const float* x, float* out,
                                                                                      float* gx, float* gv,
                                                                                      int64_t vectors,
                                                                                      const ShiftedTerms& st) {
  int64_t v = 0;
  for (; v + 2 <= vectors; v += 2) sums_avx512<2, kGrads>(x + v * 16, out + v * 16, gx + v * 16, gv + v * 16, st);
  if (v < vectors) sums_avx512<1, kGrads>(x + v * 16, out + v * 16, gx + v * 16, gv + v * 16, st);
  uint64_t redo = 0;
  for (v = 0; v < vectors; ++v) {
    const __m512 sum = _mm512_loadu_ps(out + v * 16);
    const __mmask16 kept = _mm512_cmp_ps_mask(sum, _mm512_set1_ps(kLeastSum), _CMP_GE_OQ);  // false for NaN
    const __m512 result = _mm512_add_ps(_mm512_set1_ps(st.top), vlog_normal_avx512(sum));
    _mm512_storeu_ps(out + v * 16,
                     _mm512_mask_blend_ps(kept, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()), result));
    if constexpr (kGrads) {
      const __m512 along_x = _mm512_loadu_ps(gx + v * 16), along_v = _mm512_loadu_ps(gv + v * 16);
      _mm512_storeu_ps(gx + v * 16, _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), along_x), sum));
      _mm512_storeu_ps(gv + v * 16, _mm512_div_ps(_mm512_mul_ps(along_v, _mm512_set1_ps(0.5f)), sum));
    }
    redo |= uint64_t(kept != 0xffff) << v;
  }
  return redo;
}
#pragma GCC diagnostic pop

// The same in AVX2 + FMA intrinsics, 2^t by vexp2's steps as written there.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 vlog_normal_avx2(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srai_epi32(bits, 23), _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(kMantissaMask)), _mm256_set1_epi32(kHalfExponentBits)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // (a true comparison is -1)
  m = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, m));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kLogPoly[0]), m, _mm256_set1_ps(kLogPoly[1]));
  for (int i = 2; i < 9; ++i) y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(kLogPoly[i]));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = _mm256_fmadd_ps(fe, _mm256_set1_ps(kLn2Lo), y);
  y = _mm256_fmadd_ps(_mm256_set1_ps(-0.5f), z, y);
  return _mm256_fmadd_ps(fe, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(m, y));
}

template <int V, bool kGrads>
__attribute__((target("avx2,fma"), always_inline)) inline void sums_avx2(const float* x, float* sums, float* gx,
                                                                         float* gv, const ShiftedTerms& st) {
  __m256 poly[6];
  for (int i = 0; i < 6; ++i) poly[i] = _mm256_set1_ps(kExp2Poly[i]);
  const __m256 one = _mm256_set1_ps(1.0f), least = _mm256_set1_ps(kExp2Least);
  const __m256 round = _mm256_set1_ps(kRoundWhole);
  const __m256i bias = _mm256_set1_epi32(kRoundWholeBits - 127);
  __m256 xs[V], sum[V], along_x[V], along_v[V];
  for (int v = 0; v < V; ++v) {
    xs[v] = _mm256_loadu_ps(x + v * 8);
    sum[v] = along_x[v] = along_v[v] = _mm256_setzero_ps();
  }
  const float *m = st.m.data(), *a = st.a.data(), *d = st.d.data(), *q = st.q.data(), *s2 = st.s2.data();
  for (int64_t j = 0; j < st.size(); ++j) {
    const __m256 mj = _mm256_set1_ps(m[j]), aj = _mm256_set1_ps(a[j]), dj = _mm256_set1_ps(d[j]);
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __m256 u = _mm256_mul_ps(_mm256_sub_ps(xs[v], mj), aj);
      const __m256 raw = _mm256_fnmadd_ps(u, u, dj);
      const __m256 t = _mm256_max_ps(least, raw);  // NaN stays
      const __m256 shifted = _mm256_add_ps(t, round);
      const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(shifted, round));
      __m256 p = _mm256_fmadd_ps(poly[5], f, poly[4]);
      for (int r = 3; r >= 0; --r) p = _mm256_fmadd_ps(p, f, poly[r]);
      p = _mm256_fmadd_ps(p, f, one);
      const __m256i pow2 = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(shifted), bias), 23);
      const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
      sum[v] = _mm256_add_ps(sum[v], e);
      if constexpr (kGrads) {
        const __m256 counted = _mm256_cmp_ps(raw, least, _CMP_GE_OQ);
        const __m256 zs = _mm256_mul_ps(u, _mm256_set1_ps(q[j]));
        along_x[v] = _mm256_blendv_ps(along_x[v], _mm256_fmadd_ps(e, zs, along_x[v]), counted);
        const __m256 w = _mm256_fmsub_ps(zs, zs, _mm256_set1_ps(s2[j]));
        along_v[v] = _mm256_blendv_ps(along_v[v], _mm256_fmadd_ps(e, w, along_v[v]), counted);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    _mm256_storeu_ps(sums + v * 8, sum[v]);
    if constexpr (kGrads) {
      _mm256_storeu_ps(gx + v * 8, along_x[v]);
      _mm256_storeu_ps(gv + v * 8, along_v[v]);
    }
  }
}

template <bool kGrads>
__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE uint64_t one_pass_avx2(const float* x, float* out, float* gx,
                                                                             float* gv, int64_t vectors,
                                                                             const ShiftedTerms& st) {
  int64_t v = 0;
  for (; v + 2 <= vectors; v += 2) sums_avx2<2, kGrads>(x + v * 8, out + v * 8, gx + v * 8, gv + v * 8, st);
  if (v < vectors) sums_avx2<1, kGrads>(x + v * 8, out + v * 8, gx + v * 8, gv + v * 8, st);
  uint64_t redo = 0;
  for (v = 0; v < vectors; ++v) {
    const __m256 sum = _mm256_loadu_ps(out + v * 8);
    const __m256 kept = _mm256_cmp_ps(sum, _mm256_set1_ps(kLeastSum), _CMP_GE_OQ);  // false for NaN
    const __m256 result = _mm256_add_ps(_mm256_set1_ps(st.top), vlog_normal_avx2(sum));
    _mm256_storeu_ps(out + v * 8,
                     _mm256_blendv_ps(_mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), result, kept));
    if constexpr (kGrads) {
      const __m256 along_x = _mm256_loadu_ps(gx + v * 8), along_v = _mm256_loadu_ps(gv + v * 8);
      _mm256_storeu_ps(gx + v * 8, _mm256_div_ps(_mm256_sub_ps(_mm256_setzero_ps(), along_x), sum));
      _mm256_storeu_ps(gv + v * 8, _mm256_div_ps(_mm256_mul_ps(along_v, _mm256_set1_ps(0.5f)), sum));
    }
    redo |= uint64_t(_mm256_movemask_ps(kept) != 0xff) << v;
  }
  return redo;
}
#endif

// The elements [begin, end) of x in one pass, blocks of up to 64 vectors of W lanes at a time
// (OnePass: the width's one_pass_*<kGrads>), and again in two (TwoPass: the width's
// forward_range_*<kGrads>) for the lanes it leaves NaN. 16-bit x and a partial last block
// are copied into a buffer first (float32), the slots past the end repeating the last value.
template <int W, bool kGrads, auto OnePass, auto TwoPass, typename T>
__attribute__((always_inline)) inline void shifted_range(const T* px, float* po, float* pgx, float* pgv,
                                                         int64_t begin, int64_t end, const ShiftedTerms& st,
                                                         const float* m, const float* s, const float* c, int64_t k) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  constexpr int64_t kBlock = 64 * W;
  constexpr int kOuts = kGrads ? 3 : 1;  // out, and with gradients gx and gv
  float xs[kBlock], buffers[3][kBlock], two[3][W];
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i), vectors = (n + W - 1) / W;
    const float* xb = xs;
    float* ob[3] = {buffers[0], buffers[1], buffers[2]};  // out, gx, gv (the last two unused without)
    bool direct = false;  // x and the outputs taken in place
    if constexpr (std::is_same_v<T, float>) {
      direct = n == vectors * W;
      if (direct) xb = px + i, ob[0] = po + i, ob[1] = pgx + i, ob[2] = pgv + i;
    }
    if (!direct) {
      for (int64_t t = 0; t < vectors * W; ++t) xs[t] = static_cast<float>(px[i + std::min(t, n - 1)]);
    }
    for (uint64_t redo = OnePass(xb, ob[0], ob[1], ob[2], vectors, st); redo != 0; redo &= redo - 1) {
      const int64_t v = __builtin_ctzll(redo);
      TwoPass(xb + v * W, two[0], two[1], two[2], 0, W, m, s, c, k);
      const vi again = vnan_mask<vf, vi>(load_vec<vf>(ob[0] + v * W));
      for (int o = 0; o < kOuts; ++o) {
        store_vec(ob[o] + v * W, vselect(again, load_vec<vf>(two[o]), load_vec<vf>(ob[o] + v * W)));
      }
    }
    if (!direct) {
      float* dst[3] = {po, pgx, pgv};
      for (int o = 0; o < kOuts; ++o) std::copy(ob[o], ob[o] + n, dst[o] + i);
    }
  }
}

#if DIRFAST_MIXTURE_ISAS
template <bool kGrads, typename T>
__attribute__((target("avx512f,avx512dq"))) DIRFAST_NOINLINE void shifted_range_avx512(
    const T* px, float* po, float* pgx, float* pgv, int64_t begin, int64_t end, const ShiftedTerms& st,
    const float* m, const float* s, const float* c, int64_t k) {
  shifted_range<16, kGrads, one_pass_avx512<kGrads>, forward_range_avx512<kGrads>, T>(
      px, po, pgx, pgv, begin, end, st, m, s, c, k);
}

template <bool kGrads, typename T>
__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE void shifted_range_avx2(
    const T* px, float* po, float* pgx, float* pgv, int64_t begin, int64_t end, const ShiftedTerms& st,
    const float* m, const float* s, const float* c, int64_t k) {
  shifted_range<8, kGrads, one_pass_avx2<kGrads>, forward_range_avx2<kGrads>, T>(
      px, po, pgx, pgv, begin, end, st, m, s, c, k);
}
#endif

template <bool kGrads, typename T>
DIRFAST_NOINLINE void shifted_range_baseline(const T* px, float* po, float* pgx, float* pgv, int64_t begin,
                                             int64_t end, const ShiftedTerms& st, const float* m, const float* s,
                                             const float* c, int64_t k) {
  shifted_range<4, kGrads, one_pass_baseline<kGrads>, forward_range_baseline<kGrads>, T>(
      px, po, pgx, pgv, begin, end, st, m, s, c, k);
}

// The float32 forward of the elements [begin, end) by the code of `lanes` float lanes (16, 8 or 4,
// which the machine must have): in one pass where shifted is given, else in two (16-bit x
// converted to float32 a block at a time first).
template <bool kGrads, typename T>
void forward_float_range(int lanes, const T* px, float* po, float* pgx, float* pgv, int64_t begin, int64_t end,
                         const Components<float>& comp, const ShiftedTerms* shifted) {
  const float *m = comp.m.data(), *s = comp.s.data(), *c = comp.c.data();
  const int64_t k = comp.size();
  if (shifted != nullptr) {
#if DIRFAST_MIXTURE_ISAS
    if (lanes == 16) return shifted_range_avx512<kGrads, T>(px, po, pgx, pgv, begin, end, *shifted, m, s, c, k);
    if (lanes == 8) return shifted_range_avx2<kGrads, T>(px, po, pgx, pgv, begin, end, *shifted, m, s, c, k);
#endif
    return shifted_range_baseline<kGrads, T>(px, po, pgx, pgv, begin, end, *shifted, m, s, c, k);
  }
  if constexpr (!std::is_same_v<T, float>) {
    constexpr int64_t kBlock = 1024;
    float xs[kBlock];
    for (int64_t i = begin; i < end; i += kBlock) {
      const int64_t n = std::min(kBlock, end - i);
      for (int64_t t = 0; t < n; ++t) xs[t] = static_cast<float>(px[i + t]);
      forward_float_range<kGrads, float>(lanes, xs, po + i, kGrads ? pgx + i : nullptr, kGrads ? pgv + i : nullptr,
                                         0, n, comp, nullptr);
    }
  } else {
#if DIRFAST_MIXTURE_ISAS
    if (lanes == 16) return forward_range_avx512<kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
    if (lanes == 8) return forward_range_avx2<kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
#endif
    forward_range_baseline<kGrads>(px, po, pgx, pgv, begin, end, m, s, c, k);
  }
}

// float64, kLanes elements: forward_vector's values in plain loops with std::exp and std::log.
template <bool kGrads>
void forward_lanes(const double* xs, double* out, double* gx, double* gv, const double* m, const double* s,
                   const double* c, int64_t k) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double top[kLanes], sum[kLanes], along_x[kLanes], along_v[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) top[t] = -inf;
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double z = (xs[t] - m[j]) * s[j];
      const double term = c[j] - 0.5 * z * z;
      top[t] = term > top[t] ? term : top[t];
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) {
    sum[t] = along_x[t] = along_v[t] = 0.0;
    if (top[t] == -inf) top[t] = 0.0;
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double z = (xs[t] - m[j]) * s[j];
      const double e = std::exp(c[j] - 0.5 * z * z - top[t]);
      sum[t] += e;
      if constexpr (kGrads) {
        if (e != 0.0) {
          along_x[t] += e * z * s[j];
          along_v[t] += 0.5 * e * (z * z - 1.0) * (s[j] * s[j]);
        }
      }
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) {
    out[t] = top[t] + std::log(sum[t]);
    if constexpr (kGrads) {
      const bool empty = out[t] == -inf;
      gx[t] = empty ? 0.0 : -along_x[t] / sum[t];
      gv[t] = empty ? 0.0 : along_v[t] / sum[t];
    }
  }
}

// The backward of kLanes elements, with r_k = g exp(term_k - top) / sum_j exp(term_j - top), the
// softmax of the element's terms recomputed, top its largest (exp(term_k - out) took the rounding
// of the float32 log density, ulp(z^2 / 2): 2^-5 at 1,000 standard deviations, 2^9 at 100,000, and
// summed to 1 no more): gx[t] = -sum_k r_k z s_k, and per component the sums over the lanes of r_k
// times (z s_k, (z^2 - 1) s_k^2 / 2, 1) added to gm, gv, gw [k][lane]. Three passes over the
// components: the terms and their max, the exponentials and their sum, the responsibilities;
// `kept` [k][lane] holds the terms, then the exponentials, for the next pass. An element of density
// 0 (out = -inf, or every term -inf) has no responsibilities, and a zero responsibility adds
// nothing (not 0 * inf): its gradients are 0; a NaN term makes the sum NaN, and every
// responsibility. Float32: kLanes / W vectors, a term - top below -87.3 an exponential of 0 (as
// add_term: not 2^-126).
template <int W>
__attribute__((always_inline)) inline void backward_block(const float* xs_in, const float* out_in, const float* g_in,
                                                          float* gx_out, const float* m, const float* s,
                                                          const float* c, int64_t k, float* gm, float* gv, float* gw,
                                                          float* kept) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  constexpr int V = kLanes / W;  // vectors of W lanes
  constexpr float inf = std::numeric_limits<float>::infinity();
  vf xs[V], g[V], top[V], sum[V], scale[V], gx[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    xs[v] = load_vec<vf>(xs_in + v * W);
    const vi none = load_vec<vf>(out_in + v * W) == -inf;
    g[v] = none ? vf{} : load_vec<vf>(g_in + v * W);
    top[v] = vf{} - inf;
    sum[v] = gx[v] = vf{};
  }
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vf z = (xs[v] - m[j]) * s[j];
      const vf term = vfma(-0.5f * z, z, vf{} + c[j]);  // as the forward rounds it
      store_vec(kept + j * kLanes + v * W, term);
      top[v] = term > top[v] ? term : top[v];
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) top[v] = top[v] == -inf ? vf{} : top[v];  // every term -inf (or NaN)
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vf arg = load_vec<vf>(kept + j * kLanes + v * W) - top[v];  // <= 0
      const vf e = arg < kExpLeast ? vf{} : vexp_shifted<vf, vi>(arg);
      store_vec(kept + j * kLanes + v * W, e);
      sum[v] += e;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) scale[v] = sum[v] == 0.0f ? vf{} : g[v] / sum[v];  // a sum of 0: density 0
  for (int64_t j = 0; j < k; ++j) {
    const float half_s2 = 0.5f * s[j] * s[j];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t o = j * kLanes + v * W;
      const vf z = (xs[v] - m[j]) * s[j];
      const vf r = scale[v] * load_vec<vf>(kept + o);
      const vi zero = r == 0.0f;
      const vf rz = zero ? vf{} : r * z * s[j];
      gx[v] -= rz;
      store_vec(gm + o, load_vec<vf>(gm + o) + rz);
      store_vec(gv + o, load_vec<vf>(gv + o) + (zero ? vf{} : r * vfma(z, z, vf{} - 1.0f) * half_s2));
      store_vec(gw + o, load_vec<vf>(gw + o) + r);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) store_vec(gx_out + v * W, gx[v]);
}

#if DIRFAST_MIXTURE_ISAS
__attribute__((target("avx512f"))) DIRFAST_NOINLINE void backward_lanes_avx512(
    const float* xs, const float* out, const float* g, float* gx, const float* m, const float* s, const float* c,
    int64_t k, float* gm, float* gv, float* gw, float* kept) {
  backward_block<16>(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
}

__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE void backward_lanes_avx2(
    const float* xs, const float* out, const float* g, float* gx, const float* m, const float* s, const float* c,
    int64_t k, float* gm, float* gv, float* gw, float* kept) {
  backward_block<8>(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
}
#endif

DIRFAST_NOINLINE void backward_lanes_baseline(const float* xs, const float* out, const float* g, float* gx,
                                              const float* m, const float* s, const float* c, int64_t k, float* gm,
                                              float* gv, float* gw, float* kept) {
  backward_block<4>(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
}

void backward_lanes(const float* xs, const float* out, const float* g, float* gx, const float* m, const float* s,
                    const float* c, int64_t k, float* gm, float* gv, float* gw, float* kept) {
#if DIRFAST_MIXTURE_ISAS
  const int lanes = float_lanes();
  if (lanes == 16) return backward_lanes_avx512(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
  if (lanes == 8) return backward_lanes_avx2(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
#endif
  backward_lanes_baseline(xs, out, g, gx, m, s, c, k, gm, gv, gw, kept);
}

// float64: backward_block's passes in plain loops with std::exp.
void backward_lanes(const double* xs, const double* out, const double* g, double* gx, const double* m,
                    const double* s, const double* c, int64_t k, double* gm, double* gv, double* gw, double* kept) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double top[kLanes], sum[kLanes], scale[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    gx[t] = sum[t] = 0.0;
    top[t] = -inf;
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double z = (xs[t] - m[j]) * s[j];
      const double term = c[j] - 0.5 * z * z;
      kept[j * kLanes + t] = term;
      top[t] = term > top[t] ? term : top[t];
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) top[t] = top[t] == -inf ? 0.0 : top[t];
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double e = std::exp(kept[j * kLanes + t] - top[t]);
      kept[j * kLanes + t] = e;
      sum[t] += e;
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) {
    const double gs = out[t] == -inf ? 0.0 : g[t];
    scale[t] = sum[t] == 0.0 ? 0.0 : gs / sum[t];
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double z = (xs[t] - m[j]) * s[j];
      const double r = scale[t] * kept[j * kLanes + t];
      const bool zero = r == 0.0;
      const double rz = zero ? 0.0 : r * z * s[j];
      gx[t] -= rz;
      gm[j * kLanes + t] += rz;
      gv[j * kLanes + t] += zero ? 0.0 : 0.5 * r * (z * z - 1.0) * (s[j] * s[j]);
      gw[j * kLanes + t] += r;
    }
  }
}

// Values [begin, end) of src into kLanes slots of dst in acc_t; the slots past the end repeat the
// last value (computed and dropped).
template <typename in_t, typename acc_t>
inline void load_lanes(const in_t* src, int64_t begin, int64_t end, acc_t* dst) {
  const int64_t n = end - begin;
  for (int64_t t = 0; t < kLanes; ++t) dst[t] = static_cast<acc_t>(src[begin + std::min(t, n - 1)]);
}

// out (and with kGrads gx and gv) of every element, in pieces of at least kGrainExps terms.
template <bool kGrads, typename T, typename acc_t>
DIRFAST_NOINLINE void forward_all(const T* px, acc_t* po, acc_t* pgx, acc_t* pgv, int64_t n,
                                  const Components<acc_t>& comp) {
  const int64_t grain = std::max<int64_t>(kLanes, kGrainExps / comp.size());
  if constexpr (std::is_same_v<acc_t, float>) {
    const int lanes = float_lanes();
    const std::optional<ShiftedTerms> shifted = ShiftedTerms::of(comp);
    parallel_for_ranges(n, grain, [&](int64_t begin, int64_t end) {
      forward_float_range<kGrads, T>(lanes, px, po, pgx, pgv, begin, end, comp, shifted ? &*shifted : nullptr);
    });
  } else {
    parallel_for_pieces(n, grain, [&](auto next) {
      acc_t xs[kLanes], lanes[3][kLanes];
      for (int64_t begin, end; next(begin, end);) {
        for (int64_t i = begin; i < end; i += kLanes) {
          const int64_t stop = std::min(end, i + kLanes);
          load_lanes(px, i, stop, xs);
          forward_lanes<kGrads>(xs, lanes[0], lanes[1], lanes[2], comp.m.data(), comp.s.data(), comp.c.data(),
                                comp.size());
          std::copy(lanes[0], lanes[0] + (stop - i), po + i);
          if constexpr (kGrads) {
            std::copy(lanes[1], lanes[1] + (stop - i), pgx + i);
            std::copy(lanes[2], lanes[2] + (stop - i), pgv + i);
          }
        }
      }
    });
  }
}

// grad_x of every element, and per chunk of elements the component sums [chunk][3][k] in double.
template <typename T, typename acc_t>
DIRFAST_NOINLINE void backward_all(const T* px, const acc_t* po, const acc_t* pg, acc_t* pgx, double* partials,
                                   int64_t n, const Components<acc_t>& comp) {
  const int64_t k = comp.size();
  const int64_t grain = std::max<int64_t>(1, kGrainExps / (kChunk * k));  // in chunks
  parallel_for_pieces((n + kChunk - 1) / kChunk, grain, [&](auto next) {
    std::vector<acc_t> sums(3 * k * kLanes), kept(k * kLanes);
    acc_t xs[kLanes], os[kLanes], gs[kLanes], gx[kLanes];
    for (int64_t first, last; next(first, last);) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        std::fill(sums.begin(), sums.end(), acc_t(0));
        acc_t* gm = sums.data();
        acc_t* gv = gm + k * kLanes;
        acc_t* gw = gv + k * kLanes;
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; i += kLanes) {
          const int64_t stop = std::min(end, i + kLanes);
          load_lanes(px, i, stop, xs);
          load_lanes(po, i, stop, os);
          load_lanes(pg, i, stop, gs);
          for (int64_t t = stop - i; t < kLanes; ++t) gs[t] = acc_t(0);  // the repeated slots add nothing
          backward_lanes(xs, os, gs, gx, comp.m.data(), comp.s.data(), comp.c.data(), k, gm, gv, gw, kept.data());
          std::copy(gx, gx + (stop - i), pgx + i);
        }
        double* dst = partials + chunk * 3 * k;
        for (int64_t j = 0; j < 3 * k; ++j) {
          double total = 0;
          for (int64_t t = 0; t < kLanes; ++t) total += static_cast<double>(sums[j * kLanes + t]);
          dst[j] = total;
        }
      }
    }
  });
}

// The forward, with the per-element gradients when gx is given (an empty tensor otherwise).
template <bool kGrads>
void run_forward(const Tensor& x, const Tensor& means, const Tensor& variances, const Tensor& log_weights,
                 ScalarType acc, const char* op, Tensor& out, Tensor& gx, Tensor& gv) {
  const Tensor xc = made_contiguous(x);
  const int64_t n = xc.numel();
  if (n == 0) return;
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Components<acc_t> comp(means, variances, log_weights, acc);
    dispatch_float(xc.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      forward_all<kGrads, T, acc_t>(xc.const_data_ptr<T>(), out.mutable_data_ptr<acc_t>(),
                                    kGrads ? gx.mutable_data_ptr<acc_t>() : nullptr,
                                    kGrads ? gv.mutable_data_ptr<acc_t>() : nullptr, n, comp);
    });
  });
}

ScalarType mixture_acc(const Tensor& x, const Tensor& means, const Tensor& variances, const Tensor& log_weights) {
  return acc_type({x.scalar_type(), means.scalar_type(), variances.scalar_type(), log_weights.scalar_type()});
}

Tensor mixture_logpdf_cpu(const Tensor& x, const Tensor& means, const Tensor& variances, const Tensor& log_weights) {
  const char* op = "dirfast::mixture_logpdf";
  check_mixture_args(x, means, variances, log_weights, op, torch::headeronly::DeviceType::CPU);
  const ScalarType acc = mixture_acc(x, means, variances, log_weights);
  Tensor out = empty_sized_like(x, acc), none;
  run_forward<false>(x, means, variances, log_weights, acc, op, out, none, none);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> mixture_logpdf_with_grads_cpu(const Tensor& x, const Tensor& means,
                                                                 const Tensor& variances, const Tensor& log_weights) {
  const char* op = "dirfast::mixture_logpdf_with_grads";
  check_mixture_args(x, means, variances, log_weights, op, torch::headeronly::DeviceType::CPU);
  const ScalarType acc = mixture_acc(x, means, variances, log_weights);
  Tensor out = empty_sized_like(x, acc), gx = empty_sized_like(x, acc), gv = empty_sized_like(x, acc);
  run_forward<true>(x, means, variances, log_weights, acc, op, out, gx, gv);
  return std::make_tuple(out, gx, gv);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mixture_logpdf_backward_cpu(
    const Tensor& grad, const Tensor& x, const Tensor& out, const Tensor& means, const Tensor& variances,
    const Tensor& log_weights) {
  const char* op = "dirfast::mixture_logpdf_backward";
  check_mixture_args(x, means, variances, log_weights, op, torch::headeronly::DeviceType::CPU);
  STD_TORCH_CHECK(grad.numel() == x.numel() && out.numel() == x.numel() && grad.dim() == x.dim() &&
                      out.dim() == x.dim(),
                  op, ": grad and out must have the shape of x ", shape_of(x), ", got ", shape_of(grad),
                  " and ", shape_of(out));
  const ScalarType acc = mixture_acc(x, means, variances, log_weights);
  const Tensor xc = made_contiguous(x);
  const Tensor gc = contiguous_as(grad, acc);
  const Tensor oc = contiguous_as(out, acc);
  const int64_t n = xc.numel(), k = means.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  Tensor grad_x = empty_sized_like(x, acc);
  Tensor partials = torch::stable::new_zeros(x, {std::max<int64_t>(chunks, 1), 3, k}, ScalarType::Double);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Components<acc_t> comp(means, variances, log_weights, acc);
    dispatch_float(xc.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      backward_all<T, acc_t>(xc.const_data_ptr<T>(), oc.const_data_ptr<acc_t>(), gc.const_data_ptr<acc_t>(),
                             grad_x.mutable_data_ptr<acc_t>(), partials.mutable_data_ptr<double>(), n, comp);
    });
  });
  // The chunks' sums in chunk order, whatever the threads did; each gradient its own tensor (an
  // op's outputs may not alias one another).
  const double* pp = partials.const_data_ptr<double>();
  Tensor totals[3];
  const Tensor* like[3] = {&means, &variances, &log_weights};
  for (int part = 0; part < 3; ++part) {
    Tensor total = torch::stable::new_empty(x, {k}, ScalarType::Double);
    double* pt = total.mutable_data_ptr<double>();
    for (int64_t j = 0; j < k; ++j) {
      double sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += pp[(chunk * 3 + part) * k + j];
      pt[j] = sum;
    }
    totals[part] = torch::stable::to(total, like[part]->scalar_type());
  }
  return std::make_tuple(torch::stable::to(grad_x, x.scalar_type()), totals[0], totals[1], totals[2]);
}

}  // namespace

bool mixture_logpdf_lanes(const float* x, int64_t n, const float* means, const float* variances,
                          const float* log_weights, int64_t k, int lanes, float* out, float* gx, float* gv) {
  if ((lanes != 16 && lanes != 8 && lanes != 4) || lanes > float_lanes()) return false;
  const Components<float> comp(means, variances, log_weights, k);
  const std::optional<ShiftedTerms> shifted = ShiftedTerms::of(comp);
  const ShiftedTerms* st = shifted ? &*shifted : nullptr;
  if (gx != nullptr) {
    forward_float_range<true, float>(lanes, x, out, gx, gv, 0, n, comp, st);
  } else {
    forward_float_range<false, float>(lanes, x, out, nullptr, nullptr, 0, n, comp, st);
  }
  return true;
}

}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("mixture_logpdf", TORCH_BOX(&dirfast::cpu::mixture_logpdf_cpu));
  m.impl("mixture_logpdf_backward", TORCH_BOX(&dirfast::cpu::mixture_logpdf_backward_cpu));
  m.impl("mixture_logpdf_with_grads", TORCH_BOX(&dirfast::cpu::mixture_logpdf_with_grads_cpu));
}
