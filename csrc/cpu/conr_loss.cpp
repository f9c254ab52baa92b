// dirfast::conr_loss on CPU: the per-anchor ConR losses and their feature gradients
// (dirfast/ops/conr_loss.py has the definition).
//
// The rows are normalised once (q = z / max(||z||, 1e-12)); the cosine rows of the anchors,
// q_a . q_j for every key j, are one aten::mm (torch's GEMM, called through the dispatcher).
// Then one fused pass per anchor, in one thread: the L1 label and prediction distances, the
// positive and negative masks, each term's exponent and coefficient (into per-thread rows of
// length m), the shift (the largest exponent among the terms, and 0 for the exp(0) terms), and
// the sums. Float32 exponentials run 16 lanes at a time as GCC vectors (Cephes' polynomial, as
// mixture_logpdf.cpp). The backward recomputes the same pass, writes each anchor's coefficients
// G_aj = grad_a d out_a / d prod_aj / tau over its cosine row, and turns them into the gradient
// of q with GEMMs: (G + G^T) q when the anchors are at least half the rows, else G^T q_anchors
// and G q added to the anchors' rows; then the normalisation's backward per row. Every sum is
// made by one thread in a fixed order: the same bits for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "checks.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 float vector; the rows are padded to a multiple
constexpr double kEps = 1e-12;  // F.normalize's

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
#define DIRFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIRFAST_CLONES
#endif

// ---------------------------------------------------------------------------- arguments
// The op's checks (the Python front end makes the same ones first); returns whether the push
// is "exp".
bool check_conr_args(const Tensor& features, const Tensor& labels, const Tensor& preds, const Tensor& weights,
                     double w, double tau, double e, std::string_view push, int64_t offset, int64_t count,
                     const char* op) {
  check_device_type(features, "features", op, torch::headeronly::DeviceType::CPU);
  check_float(features, "features", op);
  STD_TORCH_CHECK(features.dim() == 2, op, ": features must be [m, D], got shape ", shape_of(features));
  const int64_t m = features.size(0);
  const char* names[] = {"labels", "preds", "weights"};
  const Tensor* tensors[] = {&labels, &preds, &weights};
  for (int k = 0; k < 3; ++k) {
    check_same_device(*tensors[k], names[k], features, "features", op);
    check_float(*tensors[k], names[k], op);
  }
  STD_TORCH_CHECK(labels.dim() == 2 && labels.size(0) == m && labels.size(1) >= 1, op,
                  ": labels must be [m, L] with m = ", m, " (features.shape[0]) and L >= 1, got shape ",
                  shape_of(labels));
  STD_TORCH_CHECK(preds.dim() == 2 && preds.size(0) == labels.size(0) && preds.size(1) == labels.size(1), op,
                  ": preds must have the shape of labels ", shape_of(labels), ", got ", shape_of(preds));
  STD_TORCH_CHECK(weights.dim() == 1 && weights.size(0) == m, op, ": weights must have shape [", m,
                  "] (one weight per row of features), got ", shape_of(weights));
  STD_TORCH_CHECK(std::isfinite(w) && w >= 0, op, ": w must be a finite number >= 0, got ", w);
  STD_TORCH_CHECK(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);
  STD_TORCH_CHECK(std::isfinite(e), op, ": e must be a finite number, got ", e);
  STD_TORCH_CHECK(push == "exp" || push == "linear", op, ": push must be one of 'exp', 'linear', got '",
                  std::string(push), "'");
  STD_TORCH_CHECK(offset >= 0 && offset <= m, op, ": offset must be in [0, ", m, "] (features.shape[0]), got ",
                  offset);
  STD_TORCH_CHECK(count >= 0 && count <= m - offset, op, ": count must be in [0, ", m - offset,
                  "] (features.shape[0] - offset), got ", count);
  return push == "exp";
}

// ---------------------------------------------------------------------------- exponentials
// float32: 16 lanes as one GCC vector with Cephes' expf polynomial (about 1 ulp; as in
// mixture_logpdf.cpp: inputs below -87.3 give 2^-126 instead of 0, -inf gives 0, NaN stays NaN).
typedef float vf __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4)));

inline vf splat(float value) { return vf{} + value; }

inline vf vexp(vf x) {
  const vi minus_inf = x == -std::numeric_limits<float>::infinity();
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  n = n > fx ? n - 1.0f : n;
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
  const vf result = y * (vf)bits;
  return minus_inf ? splat(0.0f) : result;
}

inline vf load_vf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vf(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// sum_j coef[j] exp(x[j] - top) over n (a multiple of kLanes) padded entries.
DIRFAST_CLONES float sum_terms(const float* x, const float* coef, float top, int64_t n) {
  vf sum = splat(0.0f);
  for (int64_t j = 0; j < n; j += kLanes) sum += load_vf(coef + j) * vexp(load_vf(x + j) - top);
  float lanes[kLanes];
  store_vf(lanes, sum);
  float total = 0.0f;
  for (int64_t t = 0; t < kLanes; ++t) total += lanes[t];
  return total;
}

double sum_terms(const double* x, const double* coef, double top, int64_t n) {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t j = 0; j < n; j += 4) {
    for (int64_t t = 0; t < 4; ++t) lanes[t] += coef[j + t] * std::exp(x[j + t] - top);
  }
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// g[j] = scale coef[j] exp(x[j] - top) - minus pos[j] over the first m entries.
DIRFAST_CLONES void write_coefficients(const float* x, const float* coef, const float* pos, float top, float scale,
                                       float minus, int64_t m, float* g) {
  float lanes[kLanes];
  for (int64_t j = 0; j < m; j += kLanes) {
    const vf value = scale * load_vf(coef + j) * vexp(load_vf(x + j) - top) - minus * load_vf(pos + j);
    if (j + kLanes <= m) {
      store_vf(g + j, value);
    } else {
      store_vf(lanes, value);
      std::copy(lanes, lanes + (m - j), g + j);
    }
  }
}

void write_coefficients(const double* x, const double* coef, const double* pos, double top, double scale,
                        double minus, int64_t m, double* g) {
  for (int64_t j = 0; j < m; ++j) g[j] = scale * coef[j] * std::exp(x[j] - top) - minus * pos[j];
}

// ---------------------------------------------------------------------------- one anchor
// What an anchor's row pass needs: the cosine rows [count, m], the labels and predictions
// transposed ([L, m], acc), the weights (acc) and the options in acc.
template <typename acc_t>
struct Problem {
  const acc_t* cosine;
  const acc_t* labels_t;
  const acc_t* preds_t;
  const acc_t* weights;
  int64_t m, padded, num_labels, offset;
  acc_t w, tau, e;
  bool exp_push, exp0_terms, anchor_in_divisor;
};

// Per-thread rows of `padded` entries: the distances, each term's exponent x (-inf outside the
// sum), its coefficient (0 outside) and whether it is a positive (1 or 0).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> labels, preds, x, coef, pos;
  explicit Scratch(int64_t padded)
      : labels(padded), preds(padded), x(padded, -std::numeric_limits<acc_t>::infinity()), coef(padded, acc_t(0)),
        pos(padded, acc_t(0)) {}
};

template <typename acc_t>
struct Anchor {
  acc_t top, total, sum_prod, n_pos, div;
  bool valid;
  acc_t loss() const {
    return valid ? (n_pos * (top + std::log(total)) - sum_prod) / div : acc_t(0);
  }
};

// dist[j] = sum_k |v[k][i] - v[k][j]|, the columns in order.
template <typename acc_t>
DIRFAST_NOINLINE void l1_row(const acc_t* DIRFAST_RESTRICT values_t, int64_t num_labels, int64_t m, int64_t i,
                             acc_t* DIRFAST_RESTRICT dist) {
  std::fill(dist, dist + m, acc_t(0));
  for (int64_t k = 0; k < num_labels; ++k) {
    const acc_t* column = values_t + k * m;
    const acc_t anchor = column[i];
    for (int64_t j = 0; j < m; ++j) dist[j] += std::abs(anchor - column[j]);
  }
}

// The masks, exponents and coefficients of keys [begin, end), with per-lane running maxima and
// sums (kLanes lanes, combined by the caller in a fixed order).
template <typename acc_t>
DIRFAST_NOINLINE void classify(const Problem<acc_t>& pb, const acc_t* DIRFAST_RESTRICT cosine, int64_t i,
                               acc_t weight, Scratch<acc_t>& s, acc_t* DIRFAST_RESTRICT top,
                               acc_t* DIRFAST_RESTRICT sum_prod, int32_t* DIRFAST_RESTRICT n_pos,
                               int32_t* DIRFAST_RESTRICT n_neg) {
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t w = pb.w, tau = pb.tau, e = pb.e;
  const bool exp_push = pb.exp_push;
  const acc_t* DIRFAST_RESTRICT dl = s.labels.data();
  const acc_t* DIRFAST_RESTRICT dp = s.preds.data();
  acc_t* DIRFAST_RESTRICT x = s.x.data();
  acc_t* DIRFAST_RESTRICT coef = s.coef.data();
  acc_t* DIRFAST_RESTRICT pos = s.pos.data();
  for (int64_t j0 = 0; j0 < pb.m; j0 += kLanes) {
    const int64_t lanes = std::min(kLanes, pb.m - j0);
    for (int64_t t = 0; t < lanes; ++t) {
      const int64_t j = j0 + t;
      const acc_t prod = cosine[j] / tau;
      const acc_t l = dl[j];
      const bool is_pos = l <= w && j != i;
      const bool is_neg = l > w && dp[j] <= w;
      const acc_t coef_neg = exp_push ? weight : weight * (e * l);
      const acc_t x_neg = exp_push ? prod + e * l : prod;
      const bool member = is_pos || (is_neg && coef_neg != acc_t(0));
      const acc_t xj = is_pos ? prod : (member ? x_neg : minus_inf);
      x[j] = xj;
      coef[j] = is_pos ? acc_t(1) : (member ? coef_neg : acc_t(0));
      pos[j] = is_pos ? acc_t(1) : acc_t(0);
      top[t] = xj > top[t] ? xj : top[t];
      sum_prod[t] += is_pos ? prod : acc_t(0);
      n_pos[t] += is_pos;
      n_neg[t] += is_neg;
    }
  }
}

// The anchor a's pass: fills the scratch rows and returns its sums.
template <typename acc_t>
Anchor<acc_t> anchor_pass(const Problem<acc_t>& pb, int64_t a, Scratch<acc_t>& s) {
  const int64_t i = pb.offset + a;
  l1_row(pb.labels_t, pb.num_labels, pb.m, i, s.labels.data());
  l1_row(pb.preds_t, pb.num_labels, pb.m, i, s.preds.data());
  acc_t top[kLanes], sum_prod[kLanes];
  int32_t n_pos[kLanes], n_neg[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    top[t] = -std::numeric_limits<acc_t>::infinity();
    sum_prod[t] = acc_t(0);
    n_pos[t] = n_neg[t] = 0;
  }
  classify(pb, pb.cosine + a * pb.m, i, pb.weights[i], s, top, sum_prod, n_pos, n_neg);
  Anchor<acc_t> r{};
  r.top = -std::numeric_limits<acc_t>::infinity();
  r.sum_prod = acc_t(0);
  int64_t pos_count = 0, neg_count = 0;
  for (int64_t t = 0; t < kLanes; ++t) {
    r.top = top[t] > r.top ? top[t] : r.top;
    r.sum_prod += sum_prod[t];
    pos_count += n_pos[t];
    neg_count += n_neg[t];
  }
  if (pb.exp0_terms && r.top < acc_t(0)) r.top = acc_t(0);  // the exp(0) terms
  if (r.top == -std::numeric_limits<acc_t>::infinity()) r.top = acc_t(0);
  r.total = sum_terms(s.x.data(), s.coef.data(), r.top, pb.padded);
  if (pb.exp0_terms) r.total += static_cast<acc_t>(pb.m - pos_count) * std::exp(-r.top);
  r.n_pos = static_cast<acc_t>(pos_count);
  r.div = r.n_pos + (pb.anchor_in_divisor ? acc_t(1) : acc_t(0));
  r.valid = pos_count > 0 && neg_count > 0;
  return r;
}

// About 64k pair evaluations per task: a small batch runs on one thread.
int64_t grain_rows(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(m, 1)); }

template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, int64_t count, acc_t* out) {
  torch::stable::parallel_for(0, count, grain_rows(pb.m), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(pb.padded);
    for (int64_t a = begin; a < end; ++a) out[a] = anchor_pass(pb, a, s).loss();
  });
}

// Overwrites each cosine row with its coefficients G_aj / tau.
template <typename acc_t>
DIRFAST_NOINLINE void backward_rows(const Problem<acc_t>& pb, int64_t count, const acc_t* grad, acc_t* coefficients) {
  torch::stable::parallel_for(0, count, grain_rows(pb.m), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(pb.padded);
    for (int64_t a = begin; a < end; ++a) {
      const Anchor<acc_t> r = anchor_pass(pb, a, s);
      acc_t* row = coefficients + a * pb.m;
      if (!r.valid) {
        std::fill(row, row + pb.m, acc_t(0));
        continue;
      }
      const acc_t g = grad[a] / pb.tau;
      write_coefficients(s.x.data(), s.coef.data(), s.pos.data(), r.top, g * r.n_pos / (r.div * r.total),
                         g / r.div, pb.m, row);
    }
  });
}

// ---------------------------------------------------------------------------- rows of q
// q = z / max(||z||, eps) per row (acc, contiguous [m, D]); the norms into `norms`.
template <typename T, typename acc_t>
DIRFAST_NOINLINE void normalize_rows(const T* z, int64_t m, int64_t d, acc_t* q, acc_t* norms) {
  torch::stable::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* zr = z + r * d;
      acc_t* qr = q + r * d;
      acc_t lanes[8] = {};
      int64_t k = 0;
      for (; k + 8 <= d; k += 8) {
        for (int64_t t = 0; t < 8; ++t) {
          qr[k + t] = static_cast<acc_t>(zr[k + t]);
          lanes[t] += qr[k + t] * qr[k + t];
        }
      }
      for (; k < d; ++k) {
        qr[k] = static_cast<acc_t>(zr[k]);
        lanes[0] += qr[k] * qr[k];
      }
      const acc_t norm = std::sqrt(((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                                   ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
      norms[r] = norm;
      const acc_t denominator = std::max(norm, static_cast<acc_t>(kEps));
      for (k = 0; k < d; ++k) qr[k] /= denominator;
    }
  });
}

// grad_z = (grad_q - q (q . grad_q)) / ||z||, or grad_q / eps for a row of norm below eps.
template <typename acc_t, typename T>
DIRFAST_NOINLINE void normalize_backward_rows(const acc_t* grad_q, const acc_t* q, const acc_t* norms, int64_t m,
                                              int64_t d, T* grad_z) {
  torch::stable::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const acc_t* gr = grad_q + r * d;
      const acc_t* qr = q + r * d;
      T* out = grad_z + r * d;
      if (!(norms[r] >= static_cast<acc_t>(kEps))) {
        for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(gr[k] / static_cast<acc_t>(kEps));
        continue;
      }
      acc_t lanes[8] = {};
      int64_t k = 0;
      for (; k + 8 <= d; k += 8) {
        for (int64_t t = 0; t < 8; ++t) lanes[t] += qr[k + t] * gr[k + t];
      }
      for (; k < d; ++k) lanes[0] += qr[k] * gr[k];
      const acc_t along = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      const acc_t norm = norms[r];
      for (k = 0; k < d; ++k) out[k] = static_cast<T>((gr[k] - qr[k] * along) / norm);
    }
  });
}

// H[r][c] = G(r, c) + G(c, r), G(r, .) the coefficient row of anchor r - offset (0 for a row
// that is no anchor): grad_q = H q.
template <typename acc_t>
DIRFAST_NOINLINE void symmetrize(const acc_t* g, int64_t m, int64_t offset, int64_t count, acc_t* h) {
  torch::stable::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      acc_t* hr = h + r * m;
      const bool anchor = r >= offset && r < offset + count;
      for (int64_t c = 0; c < m; ++c) hr[c] = anchor ? g[(r - offset) * m + c] : acc_t(0);
      for (int64_t c = offset; c < offset + count; ++c) hr[c] += g[(c - offset) * m + r];
    }
  });
}

// ---------------------------------------------------------------------------- the ops
inline Tensor mm(const Tensor& a, const Tensor& b) {
  using torch::stable::detail::from;
  return call_aten<2>("aten::mm", "", {from(a), from(b)});
}

// The normalised rows (acc, [m, D]), their norms ([m]), the cosine rows of the anchors
// ([count, m]) and the transposed labels and predictions ([L, m]), all contiguous in acc.
struct Prepared {
  Tensor q, norms, cosine, labels_t, preds_t, weights;
};

Prepared prepare(const Tensor& features, const Tensor& labels, const Tensor& preds, const Tensor& weights,
                 ScalarType acc, int64_t offset, int64_t count, const char* op) {
  const int64_t m = features.size(0), d = features.size(1);
  Tensor q = empty({m, d}, acc, features);
  Tensor norms = empty({m}, acc, features);
  const Tensor z = torch::stable::contiguous(features);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    dispatch_float(z.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      normalize_rows<T, acc_t>(z.const_data_ptr<T>(), m, d, q.mutable_data_ptr<acc_t>(), norms.mutable_data_ptr<acc_t>());
    });
  });
  Tensor anchors = torch::stable::narrow(q, 0, offset, count);
  Tensor cosine = torch::stable::contiguous(mm(anchors, torch::stable::transpose(q, 0, 1)));
  return {q, norms, cosine,
          contiguous_as(torch::stable::transpose(labels, 0, 1), acc),
          contiguous_as(torch::stable::transpose(preds, 0, 1), acc), contiguous_as(weights, acc)};
}

template <typename acc_t>
Problem<acc_t> problem(const Prepared& p, int64_t m, int64_t offset, double w, double tau, double e, bool exp_push,
                       bool exp0_terms, bool anchor_in_divisor) {
  return {p.cosine.const_data_ptr<acc_t>(), p.labels_t.const_data_ptr<acc_t>(), p.preds_t.const_data_ptr<acc_t>(),
          p.weights.const_data_ptr<acc_t>(), m, (m + kLanes - 1) / kLanes * kLanes, p.labels_t.size(0), offset,
          static_cast<acc_t>(w), static_cast<acc_t>(tau), static_cast<acc_t>(e), exp_push, exp0_terms,
          anchor_in_divisor};
}

Tensor conr_loss_cpu(const Tensor& features, const Tensor& labels, const Tensor& preds, const Tensor& weights,
                     double w, double tau, double e, std::string_view push, bool exp0_terms, bool anchor_in_divisor,
                     int64_t offset, int64_t count) {
  const char* op = "dirfast::conr_loss";
  const bool exp_push = check_conr_args(features, labels, preds, weights, w, tau, e, push, offset, count, op);
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type(), preds.scalar_type(),
                                   weights.scalar_type()});
  Tensor out = empty({count}, acc, features);
  if (count == 0) return out;
  const Prepared p = prepare(features, labels, preds, weights, acc, offset, count, op);
  const int64_t m = features.size(0);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    forward_rows(problem<acc_t>(p, m, offset, w, tau, e, exp_push, exp0_terms, anchor_in_divisor), count,
                 out.mutable_data_ptr<acc_t>());
  });
  return out;
}

Tensor conr_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& labels, const Tensor& preds,
                              const Tensor& weights, double w, double tau, double e, std::string_view push,
                              bool exp0_terms, bool anchor_in_divisor, int64_t offset, int64_t count) {
  const char* op = "dirfast::conr_loss_backward";
  const bool exp_push = check_conr_args(features, labels, preds, weights, w, tau, e, push, offset, count, op);
  check_same_device(grad, "grad", features, "features", op);
  check_float(grad, "grad", op);
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == count, op, ": grad must have shape [", count,
                  "] (count), got ", shape_of(grad));
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type(), preds.scalar_type(),
                                   weights.scalar_type()});
  const int64_t m = features.size(0), d = features.size(1);
  Tensor result = empty({m, d}, features.scalar_type(), features);
  if (count == 0 || d == 0) {
    torch::stable::zero_(result);
    return result;
  }
  const Prepared p = prepare(features, labels, preds, weights, acc, offset, count, op);
  const Tensor g = contiguous_as(grad, acc);
  Tensor coefficients = p.cosine;  // overwritten row by row
  Tensor grad_q;
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    backward_rows(problem<acc_t>(p, m, offset, w, tau, e, exp_push, exp0_terms, anchor_in_divisor), count,
                  g.const_data_ptr<acc_t>(), coefficients.mutable_data_ptr<acc_t>());
    if (2 * count >= m) {  // one [m, m] GEMM costs no more than two [count, m] ones
      Tensor h = empty({m, m}, acc, features);
      symmetrize(coefficients.const_data_ptr<acc_t>(), m, offset, count, h.mutable_data_ptr<acc_t>());
      grad_q = mm(h, p.q);
    } else {
      Tensor q = p.q;
      Tensor anchors = torch::stable::narrow(q, 0, offset, count);
      grad_q = torch::stable::contiguous(mm(torch::stable::transpose(coefficients, 0, 1), anchors));
      const Tensor own = torch::stable::contiguous(mm(coefficients, p.q));
      acc_t* gq = grad_q.mutable_data_ptr<acc_t>() + offset * d;
      const acc_t* po = own.const_data_ptr<acc_t>();
      for (int64_t k = 0; k < count * d; ++k) gq[k] += po[k];
    }
    grad_q = torch::stable::contiguous(grad_q);
    dispatch_float(features.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      normalize_backward_rows<acc_t, T>(grad_q.const_data_ptr<acc_t>(), p.q.const_data_ptr<acc_t>(),
                                        p.norms.const_data_ptr<acc_t>(), m, d, result.mutable_data_ptr<T>());
    });
  });
  return result;
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("conr_loss", TORCH_BOX(&dirfast::cpu::conr_loss_cpu));
  m.impl("conr_loss_backward", TORCH_BOX(&dirfast::cpu::conr_loss_backward_cpu));
}
