// dirfast::mixture_logpdf on CPU: out = log sum_k w_k N(x; m_k, v_k) + log(2 pi) / 2 for every
// element, and its backward, without an [N, K] matrix.
//
// With c_k = log w_k - log(v_k) / 2 and h_k = 1 / (2 v_k), term_k(x) = c_k - h_k (x - m_k)^2 and
// out = max_k term + log sum_k exp(term_k - max). Elements are taken kLanes at a time (converted
// to the arithmetic type in a small buffer); float32 computes the lanes as one GCC vector with a
// polynomial exp (Cephes, about 1 ulp), compiled for AVX-512, AVX2 and the baseline with
// run-time selection; float64 uses plain loops and std::exp. The backward recomputes each element's
// responsibilities r_k = exp(term_k - out) and sums the component gradients per fixed chunk of
// elements, the chunks then added in order: the same bits for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;          // elements computed together (one AVX-512 float vector)
constexpr int64_t kChunk = int64_t(1) << 14;  // elements per task: fixed, so results do not depend on threads

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
#define DIRFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIRFAST_CLONES
#endif

// float32: 16 lanes as one GCC vector (AVX-512 in the avx512f clone, two AVX2 or four SSE
// registers in the others), with Cephes' expf polynomial (about 1 ulp on [-87.3, 88.3]; inputs
// below give 2^-126 instead of 0, and -inf gives 0). float64: plain loops and std::exp.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4)));

inline vf splat(float value) { return vf{} + value; }

inline vf vexp(vf x) {
  const vi minus_inf = x == -std::numeric_limits<float>::infinity();
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // floor(fx) for any sign:
  n = n > fx ? n - 1.0f : n;                                             // truncation, corrected
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf result = y * reinterpret_cast<const vf&>(bits);
  return minus_inf ? splat(0.0f) : result;
}

inline vf load_vf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vf(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// The components in the arithmetic type: means, h = 1 / (2 v), c = log w - log(v) / 2.
template <typename acc_t>
struct Components {
  std::vector<acc_t> m, h, c;
  explicit Components(const at::Tensor& means, const at::Tensor& variances, const at::Tensor& log_weights,
                      at::ScalarType acc_type) {
    const at::Tensor mt = means.to(acc_type).contiguous(), vt = variances.to(acc_type).contiguous();
    const at::Tensor wt = log_weights.to(acc_type).contiguous();
    const int64_t k = mt.numel();
    m.assign(mt.data_ptr<acc_t>(), mt.data_ptr<acc_t>() + k);
    h.resize(k);
    c.resize(k);
    for (int64_t i = 0; i < k; ++i) {
      const acc_t v = vt.data_ptr<acc_t>()[i];
      h[i] = acc_t(0.5) / v;
      c[i] = wt.data_ptr<acc_t>()[i] - acc_t(0.5) * std::log(v);
    }
  }
  int64_t size() const { return static_cast<int64_t>(m.size()); }
};

// out[t] for kLanes values xs[t]; an element whose every term is -inf (every weight 0) gets -inf.
DIRFAST_CLONES void forward_lanes(const float* xs_in, float* out, const float* m, const float* h, const float* c,
                                  int64_t k) {
  const vf xs = load_vf(xs_in);
  vf top = splat(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < k; ++j) {
    const vf d = xs - m[j];
    const vf term = c[j] - h[j] * d * d;
    top = term > top ? term : top;
  }
  const vi none = top == -std::numeric_limits<float>::infinity();
  const vf shift = none ? splat(0.0f) : top;
  vf sum = splat(0.0f);
  for (int64_t j = 0; j < k; ++j) {
    const vf d = xs - m[j];
    sum += vexp(c[j] - h[j] * d * d - shift);
  }
  float s[kLanes], t[kLanes];
  store_vf(s, sum);
  store_vf(t, shift);
  for (int64_t i = 0; i < kLanes; ++i) out[i] = s[i] > 0 ? t[i] + std::log(s[i]) : -std::numeric_limits<float>::infinity();
}

void forward_lanes(const double* xs, double* out, const double* m, const double* h, const double* c, int64_t k) {
  double top[kLanes], sum[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) top[t] = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double d = xs[t] - m[j];
      top[t] = std::max(top[t], c[j] - h[j] * d * d);
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) {
    sum[t] = 0.0;
    if (top[t] == -std::numeric_limits<double>::infinity()) top[t] = 0.0;
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < kLanes; ++t) {
      const double d = xs[t] - m[j];
      sum[t] += std::exp(c[j] - h[j] * d * d - top[t]);
    }
  }
  for (int64_t t = 0; t < kLanes; ++t) {
    out[t] = sum[t] > 0 ? top[t] + std::log(sum[t]) : -std::numeric_limits<double>::infinity();
  }
}

// The backward of kLanes elements: gx[t] = -sum_k g r_k 2 h_k (x - m_k), and per component the
// sums over the lanes of g r_k times (2 h_k d, 2 h_k^2 d^2 - h_k, 1) added to gm, gv, gw [k][lane].
// An element of density 0 (out = -inf) has no responsibilities: its gradients are 0.
DIRFAST_CLONES void backward_lanes(const float* xs_in, const float* out_in, const float* g_in, float* gx_out,
                                   const float* m, const float* h, const float* c, int64_t k, float* gm, float* gv,
                                   float* gw) {
  const vf xs = load_vf(xs_in), out = load_vf(out_in);
  const vi none = out == -std::numeric_limits<float>::infinity();
  const vf g = none ? splat(0.0f) : load_vf(g_in), shift = none ? splat(0.0f) : out;
  vf gx = splat(0.0f);
  for (int64_t j = 0; j < k; ++j) {
    const float two_h = 2.0f * h[j];
    const vf d = xs - m[j];
    const vf r = g * vexp(c[j] - h[j] * d * d - shift);
    const vf rd = r * two_h * d;
    gx -= rd;
    store_vf(gm + j * kLanes, load_vf(gm + j * kLanes) + rd);
    store_vf(gv + j * kLanes, load_vf(gv + j * kLanes) + r * (two_h * h[j] * d * d - h[j]));
    store_vf(gw + j * kLanes, load_vf(gw + j * kLanes) + r);
  }
  store_vf(gx_out, gx);
}

void backward_lanes(const double* xs, const double* out, const double* g, double* gx, const double* m,
                    const double* h, const double* c, int64_t k, double* gm, double* gv, double* gw) {
  double gs[kLanes], os[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    gx[t] = 0.0;
    const bool none = out[t] == -std::numeric_limits<double>::infinity();
    gs[t] = none ? 0.0 : g[t];
    os[t] = none ? 0.0 : out[t];
  }
  for (int64_t j = 0; j < k; ++j) {
    const double two_h = 2.0 * h[j];
    for (int64_t t = 0; t < kLanes; ++t) {
      const double d = xs[t] - m[j];
      const double r = gs[t] * std::exp(c[j] - h[j] * d * d - os[t]);
      const double rd = r * two_h * d;
      gx[t] -= rd;
      gm[j * kLanes + t] += rd;
      gv[j * kLanes + t] += r * (two_h * h[j] * d * d - h[j]);
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

void check_mixture_args(const at::Tensor& x, const at::Tensor& means, const at::Tensor& variances,
                        const at::Tensor& log_weights, const char* op) {
  check_device_type(x, "x", op, c10::DeviceType::CPU);
  check_float(x, "x", op);
  TORCH_CHECK(means.dim() == 1 && means.numel() >= 1, op,
              ": means must be 1-D with at least one component, got shape ", means.sizes());
  const std::pair<const char*, const at::Tensor*> tables[] = {
      {"means", &means}, {"variances", &variances}, {"log_weights", &log_weights}};
  for (const auto& entry : tables) {
    check_same_device(*entry.second, entry.first, x, "x", op);
    check_float(*entry.second, entry.first, op);
    TORCH_CHECK(entry.second->sizes() == means.sizes(), op, ": ", entry.first, " must have shape ",
                means.sizes(), " (that of means), got ", entry.second->sizes());
  }
}

at::ScalarType acc_type_of(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

at::Tensor mixture_logpdf_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& variances,
                              const at::Tensor& log_weights) {
  const char* op = "dirfast::mixture_logpdf";
  check_mixture_args(x, means, variances, log_weights, op);
  const at::ScalarType acc_type = acc_type_of({x, means, variances, log_weights});
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(acc_type));
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "dirfast::mixture_logpdf", [&] {
    using acc_t = scalar_t;
    const Components<acc_t> comp(means, variances, log_weights, acc_type);
    acc_t* po = out.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dirfast::mixture_logpdf x", [&] {
      const scalar_t* px = xc.data_ptr<scalar_t>();
      at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t first, int64_t last) {
        acc_t xs[kLanes], lanes[kLanes];
        for (int64_t chunk = first; chunk < last; ++chunk) {
          const int64_t end = std::min(n, (chunk + 1) * kChunk);
          for (int64_t i = chunk * kChunk; i < end; i += kLanes) {
            const int64_t stop = std::min(end, i + kLanes);
            load_lanes(px, i, stop, xs);
            forward_lanes(xs, lanes, comp.m.data(), comp.h.data(), comp.c.data(), comp.size());
            std::copy(lanes, lanes + (stop - i), po + i);
          }
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_logpdf_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out, const at::Tensor& means,
    const at::Tensor& variances, const at::Tensor& log_weights) {
  const char* op = "dirfast::mixture_logpdf_backward";
  check_mixture_args(x, means, variances, log_weights, op);
  TORCH_CHECK(grad.sizes() == x.sizes() && out.sizes() == x.sizes(), op,
              ": grad and out must have the shape of x ", x.sizes());
  const at::ScalarType acc_type = acc_type_of({x, means, variances, log_weights});
  const at::Tensor xc = x.contiguous(), gc = grad.to(acc_type).contiguous(), oc = out.to(acc_type).contiguous();
  const int64_t n = xc.numel(), k = means.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::Tensor grad_x = at::empty(x.sizes(), x.options().dtype(acc_type));
  at::Tensor partials = at::zeros({std::max<int64_t>(chunks, 1), 3, k}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "dirfast::mixture_logpdf_backward", [&] {
    using acc_t = scalar_t;
    const Components<acc_t> comp(means, variances, log_weights, acc_type);
    const acc_t* pg = gc.data_ptr<acc_t>();
    const acc_t* po = oc.data_ptr<acc_t>();
    acc_t* pgx = grad_x.data_ptr<acc_t>();
    double* pp = partials.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dirfast::mixture_logpdf_backward x",
                                    [&] {
      const scalar_t* px = xc.data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
        std::vector<acc_t> sums(3 * k * kLanes);
        acc_t xs[kLanes], os[kLanes], gs[kLanes], gx[kLanes];
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
            backward_lanes(xs, os, gs, gx, comp.m.data(), comp.h.data(), comp.c.data(), k, gm, gv, gw);
            std::copy(gx, gx + (stop - i), pgx + i);
          }
          double* dst = pp + chunk * 3 * k;
          for (int64_t j = 0; j < 3 * k; ++j) {
            double total = 0;
            for (int64_t t = 0; t < kLanes; ++t) total += static_cast<double>(sums[j * kLanes + t]);
            dst[j] = total;
          }
        }
      });
    });
  });
  at::Tensor totals = at::zeros({3, k}, x.options().dtype(at::kDouble));
  const double* pp = partials.data_ptr<double>();
  double* pt = totals.data_ptr<double>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // in chunk order, whatever the threads did
    for (int64_t j = 0; j < 3 * k; ++j) pt[j] += pp[chunk * 3 * k + j];
  }
  // Copies, never views: an op's outputs may not alias one another.
  return std::make_tuple(grad_x.to(x.scalar_type()), totals[0].to(means.scalar_type(), false, true),
                         totals[1].to(variances.scalar_type(), false, true),
                         totals[2].to(log_weights.scalar_type(), false, true));
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("mixture_logpdf", &dirfast::cpu::mixture_logpdf_cpu);
  m.impl("mixture_logpdf_backward", &dirfast::cpu::mixture_logpdf_backward_cpu);
}
