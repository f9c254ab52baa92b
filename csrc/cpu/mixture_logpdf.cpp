// dirfast::mixture_logpdf on CPU: out = log sum_k w_k N(x; m_k, v_k) + log(2 pi) / 2 for every
// element, and its backward, without an [N, K] matrix.
//
// With s_k = 1 / sqrt(v_k) and c_k = log w_k + log s_k, z = (x - m_k) s_k, term_k(x) = c_k - z^2 / 2
// and out = max_k term + log sum_k exp(term_k - max) (the reference's formulation: a subnormal
// variance keeps a finite s_k). A component with invalid parameters gets c_k = NaN, so every
// output is NaN (dirfast.ops.mixture_logpdf documents the rule). The float32 forward computes a
// vector of elements at a time with polynomial exp and log (Cephes, about 1 ulp, by explicit fused
// multiply-adds) in the machine's vector width: AVX-512, AVX2 + FMA or the baseline (libm's fmaf
// there), chosen at run time, with the same bits. The float64 forward uses plain loops and
// std::exp. The backward takes elements kLanes at a time (converted to the arithmetic type in a
// small buffer; in float32 as kLanes / W vectors of the machine's width W, by fused multiply-adds
// and vexp_shifted, as term_k - out <= 0: the same bits for every width), recomputes each
// element's responsibilities r_k = exp(term_k - out) and sums the component gradients per fixed
// chunk of elements, the chunks then added in order: the same bits for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

// No a * b + c is fused but by vfma (g++ would fuse others in the AVX2 + FMA and AVX-512 code):
// every vector width rounds alike (above the project's headers: theirs too).
#pragma GCC optimize("fp-contract=off")

#include "checks.h"
#include "parallel.h"
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
    const int64_t k = mt.numel();
    const acc_t* pm = mt.const_data_ptr<acc_t>();
    const acc_t* pv = vt.const_data_ptr<acc_t>();
    const acc_t* pw = wt.const_data_ptr<acc_t>();
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
// e (z^2 - 1) s^2 / 2 (an e of 0 adds nothing to them, not 0 * inf).
template <int W, bool kGrads>
__attribute__((always_inline)) inline void add_term(typename FloatVec<W>::f arg, typename FloatVec<W>::f z, float s,
                                                    typename FloatVec<W>::f& sum, typename FloatVec<W>::f& along_x,
                                                    typename FloatVec<W>::f& along_v) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  if constexpr (kGrads) {
    const vf e = arg == -std::numeric_limits<float>::infinity() ? vf{} : vexp_shifted<vf, vi>(arg);
    const vi zero = e == 0.0f;
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

// Elements [begin, end) of x, W at a time (16-bit x converted first; the slots past the end
// repeat the last value, computed and dropped). kGrads: also gx and gv, as forward_vector.
template <int W, bool kGrads, typename T>
__attribute__((always_inline)) inline void forward_range(const T* px, float* po, float* pgx, float* pgv, int64_t begin,
                                                         int64_t end, const float* m, const float* s, const float* c,
                                                         int64_t k) {
  int64_t i = begin;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + W <= end; i += W) {
      forward_vector<W, kGrads>(px + i, po + i, kGrads ? pgx + i : nullptr, kGrads ? pgv + i : nullptr, m, s, c, k);
    }
  }
  float xs[W], lanes[3][W];
  for (; i < end; i += W) {
    const int64_t n = std::min<int64_t>(W, end - i);
    for (int64_t t = 0; t < W; ++t) xs[t] = static_cast<float>(px[i + std::min(t, n - 1)]);
    forward_vector<W, kGrads>(xs, lanes[0], lanes[1], lanes[2], m, s, c, k);
    std::copy(lanes[0], lanes[0] + n, po + i);
    if constexpr (kGrads) {
      std::copy(lanes[1], lanes[1] + n, pgx + i);
      std::copy(lanes[2], lanes[2] + n, pgv + i);
    }
  }
}

#if DIRFAST_MIXTURE_ISAS
template <bool kGrads, typename T>
__attribute__((target("avx512f"))) DIRFAST_NOINLINE void forward_range_avx512(const T* px, float* po, float* pgx,
                                                                               float* pgv, int64_t begin, int64_t end,
                                                                               const float* m, const float* s,
                                                                               const float* c, int64_t k) {
  forward_range<16, kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, k);
}

template <bool kGrads, typename T>
__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE void forward_range_avx2(const T* px, float* po, float* pgx,
                                                                              float* pgv, int64_t begin, int64_t end,
                                                                              const float* m, const float* s,
                                                                              const float* c, int64_t k) {
  forward_range<8, kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, k);
}
#endif

template <bool kGrads, typename T>
DIRFAST_NOINLINE void forward_range_baseline(const T* px, float* po, float* pgx, float* pgv, int64_t begin,
                                             int64_t end, const float* m, const float* s, const float* c, int64_t k) {
  forward_range<4, kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, k);
}

// The widest of the three the machine has (16, 8 or 4 float32 lanes).
inline int float_lanes() {
#if DIRFAST_MIXTURE_ISAS
  static const int lanes = __builtin_cpu_supports("avx512f")                                   ? 16
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 8
                                                                                               : 4;
  return lanes;
#else
  return 4;
#endif
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

// The backward of kLanes elements, with r_k = g exp(term_k - out): gx[t] = -sum_k r_k z s_k, and per
// component the sums over the lanes of r_k times (z s_k, (z^2 - 1) s_k^2 / 2, 1) added to gm, gv,
// gw [k][lane]. An element of density 0 (out = -inf) has no responsibilities, and a zero
// responsibility adds nothing (not 0 * inf): its gradients are 0. Float32: kLanes / W vectors.
template <int W>
__attribute__((always_inline)) inline void backward_block(const float* xs_in, const float* out_in, const float* g_in,
                                                          float* gx_out, const float* m, const float* s,
                                                          const float* c, int64_t k, float* gm, float* gv, float* gw) {
  using vf = typename FloatVec<W>::f;
  using vi = typename FloatVec<W>::i;
  constexpr int V = kLanes / W;  // vectors of W lanes
  vf xs[V], g[V], shift[V], gx[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    xs[v] = load_vec<vf>(xs_in + v * W);
    const vf out = load_vec<vf>(out_in + v * W);
    const vi none = out == -std::numeric_limits<float>::infinity();
    g[v] = none ? vf{} : load_vec<vf>(g_in + v * W);
    shift[v] = none ? vf{} : out;
    gx[v] = vf{};
  }
  for (int64_t j = 0; j < k; ++j) {
    const float half_s2 = 0.5f * s[j] * s[j];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vf z = (xs[v] - m[j]) * s[j];
      const vf arg = vfma(-0.5f * z, z, c[j] - shift[v]);  // term - out <= 0, but for rounding
      const vf r = arg == -std::numeric_limits<float>::infinity() ? vf{} : g[v] * vexp_shifted<vf, vi>(arg);
      const vi zero = r == 0.0f;
      const vf rz = zero ? vf{} : r * z * s[j];
      gx[v] -= rz;
      const int64_t o = j * kLanes + v * W;
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
    int64_t k, float* gm, float* gv, float* gw) {
  backward_block<16>(xs, out, g, gx, m, s, c, k, gm, gv, gw);
}

__attribute__((target("avx2,fma"))) DIRFAST_NOINLINE void backward_lanes_avx2(
    const float* xs, const float* out, const float* g, float* gx, const float* m, const float* s, const float* c,
    int64_t k, float* gm, float* gv, float* gw) {
  backward_block<8>(xs, out, g, gx, m, s, c, k, gm, gv, gw);
}
#endif

DIRFAST_NOINLINE void backward_lanes_baseline(const float* xs, const float* out, const float* g, float* gx,
                                              const float* m, const float* s, const float* c, int64_t k, float* gm,
                                              float* gv, float* gw) {
  backward_block<4>(xs, out, g, gx, m, s, c, k, gm, gv, gw);
}

void backward_lanes(const float* xs, const float* out, const float* g, float* gx, const float* m, const float* s,
                    const float* c, int64_t k, float* gm, float* gv, float* gw) {
#if DIRFAST_MIXTURE_ISAS
  const int lanes = float_lanes();
  if (lanes == 16) return backward_lanes_avx512(xs, out, g, gx, m, s, c, k, gm, gv, gw);
  if (lanes == 8) return backward_lanes_avx2(xs, out, g, gx, m, s, c, k, gm, gv, gw);
#endif
  backward_lanes_baseline(xs, out, g, gx, m, s, c, k, gm, gv, gw);
}

void backward_lanes(const double* xs, const double* out, const double* g, double* gx, const double* m,
                    const double* s, const double* c, int64_t k, double* gm, double* gv, double* gw) {
  double gs[kLanes], os[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    gx[t] = 0.0;
    const bool none = out[t] == -std::numeric_limits<double>::infinity();
    gs[t] = none ? 0.0 : g[t];
    os[t] = none ? 0.0 : out[t];
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double z = (xs[t] - m[j]) * s[j];
      const double r = gs[t] * std::exp(c[j] - 0.5 * z * z - os[t]);
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
    const float *m = comp.m.data(), *s = comp.s.data(), *c = comp.c.data();
    parallel_for_ranges(n, grain, [&](int64_t begin, int64_t end) {
#if DIRFAST_MIXTURE_ISAS
      if (lanes == 16) return forward_range_avx512<kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, comp.size());
      if (lanes == 8) return forward_range_avx2<kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, comp.size());
#endif
      forward_range_baseline<kGrads, T>(px, po, pgx, pgv, begin, end, m, s, c, comp.size());
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
    std::vector<acc_t> sums(3 * k * kLanes);
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
          backward_lanes(xs, os, gs, gx, comp.m.data(), comp.s.data(), comp.c.data(), k, gm, gv, gw);
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
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("mixture_logpdf", TORCH_BOX(&dirfast::cpu::mixture_logpdf_cpu));
  m.impl("mixture_logpdf_backward", TORCH_BOX(&dirfast::cpu::mixture_logpdf_backward_cpu));
  m.impl("mixture_logpdf_with_grads", TORCH_BOX(&dirfast::cpu::mixture_logpdf_with_grads_cpu));
}
