// dirfast::conr_loss on CPU: the per-anchor ConR losses and their feature gradients
// (dirfast/ops/conr_loss.py has the definition).
//
// The rows are normalised once (q = z / max(||z||, 1e-12)). Only the members of an anchor's sums
// (its positives, and its negatives of non-zero push) need prod_aj = q_a . q_j / tau, and with
// real labels (integer ages, w = 1) they are a few percent of the pairs; so one pass over the
// label and prediction masks counts them, and the kernel takes one of two paths by their share
// (kSparseDensity below):
// - sparse: per anchor, the members' keys are compacted, their dot products computed (four keys
//   at a time) and the sums made over them; the backward writes the members' coefficients
//   G_aj = grad_a d out_a / d prod_aj / tau as sparse rows, transposes them (a counting sort),
//   and sums grad_q[r] = sum_c (G(r, c) + G(c, r)) q_c over the member pairs only. No GEMM.
// - GEMM: the cosine rows of the anchors are one aten::mm (torch's GEMM, called through the
//   dispatcher), then one fused pass per anchor over all keys (masks, exponents, coefficients,
//   shift and sums as 8-lane GCC vectors in float32); the backward writes the coefficients over
//   the cosine rows and turns them into the gradient of q with GEMMs: (G + G^T) q when the anchors
//   are at least half the rows, else G^T q_anchors and G q added to the anchors' rows.
// Both paths share the sums (the shift is the largest exponent among the terms, and 0 for the
// exp(0) terms; exponentials by Cephes' polynomial in float32, compiled for AVX-512, AVX2 and the
// baseline) and end with the normalisation's backward per row. Every sum is made by one thread
// in a fixed order: the same bits for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "checks.h"
#include "parallel.h"
#include "vexp.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;  // keys per step of the row pass; the rows are padded to a multiple
constexpr int64_t kVec = 8;     // float32 lanes of the exponentials: one AVX2 register (16 spill there)
constexpr double kEps = 1e-12;  // F.normalize's

// The row loops cloned for AVX-512F and AVX2, only those above the build's baseline (src/macros.h).
#if defined(__AVX512F__)
#define DIRFAST_CLONES
#elif defined(__AVX2__)
#define DIRFAST_CLONES DIRFAST_TARGET_CLONES("avx512f", "default")
#else
#define DIRFAST_CLONES DIRFAST_TARGET_CLONES("avx512f", "avx2", "default")
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
  // prod = cos / tau in the accumulation dtype: a normal number there (its reciprocal finite; a
  // subnormal one may round so that 1 / tau is inf, and is 0 where denormals are flushed).
  const bool is_float = acc_type({features.scalar_type(), labels.scalar_type(), preds.scalar_type(),
                                  weights.scalar_type()}) == ScalarType::Float;
  const double big = is_float ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  const double tiny = is_float ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  STD_TORCH_CHECK(tau <= big && tau >= tiny, op, ": tau must be in [", tiny, ", ", big,
                  "] (a normal number in the dtype the op computes in: it and 1/tau finite there), got ", tau);
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
// float32: 8 lanes as one GCC vector with Cephes' expf polynomial (about 1 ulp; as in
// mixture_logpdf.cpp: inputs below -87.3 give 2^-126 instead of 0, -inf gives 0, NaN stays NaN).
using vf = FloatVec<kVec>::f;
using vi = FloatVec<kVec>::i;
inline vf splat(float value) { return vf{} + value; }
inline vf vexp(vf x) { return dirfast::vexp<vf, vi>(x); }
inline vf load_vf(const float* p) { return load_vec<vf>(p); }
inline void store_vf(float* p, vf v) { store_vec(p, v); }

// terms[j] = coef[j] exp(x[j] - top) over n (a multiple of kLanes) padded entries; returns their sum.
DIRFAST_CLONES float sum_terms(const float* x, const float* coef, float top, int64_t n, float* terms) {
  vf sum = splat(0.0f);
  for (int64_t j = 0; j < n; j += kVec) {
    const vf term = load_vf(coef + j) * vexp(load_vf(x + j) - top);
    store_vf(terms + j, term);
    sum += term;
  }
  float lanes[kVec];
  store_vf(lanes, sum);
  float total = 0.0f;
  for (int64_t t = 0; t < kVec; ++t) total += lanes[t];
  return total;
}

double sum_terms(const double* x, const double* coef, double top, int64_t n, double* terms) {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t j = 0; j < n; j += 4) {
    for (int64_t t = 0; t < 4; ++t) {
      terms[j + t] = coef[j + t] * std::exp(x[j + t] - top);
      lanes[t] += terms[j + t];
    }
  }
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// An anchor's coefficients over the first m entries, g[j] = (share terms[j] / total - minus pos[j])
// / tau, share = grad |P| / div and minus = grad / div: each term's share of the sum first (at most
// 1) and tau last, so that nothing passes acc_t's range where g does not (share / total / tau
// overflows at the smallest tau where the largest term, a pushed negative, is below 1).
template <typename acc_t>
DIRFAST_NOINLINE void write_coefficients(const acc_t* DIRFAST_RESTRICT terms, const acc_t* DIRFAST_RESTRICT pos,
                                         acc_t share, acc_t minus, acc_t total, acc_t tau, int64_t m,
                                         acc_t* DIRFAST_RESTRICT g) {
  for (int64_t j = 0; j < m; ++j) g[j] = (share * (terms[j] / total) - minus * pos[j]) / tau;
}

// ---------------------------------------------------------------------------- one anchor
// What an anchor's row pass needs: the cosine rows [count, m], the labels and predictions
// transposed ([L, m], acc), the weights (acc) and the options in acc.
template <typename acc_t>
struct Problem {
  const acc_t* cosine;  // the GEMM path's [count, m] rows; null on the sparse path
  const acc_t* q;       // the normalised rows [m, d] (the sparse path's dot products)
  const acc_t* labels_t;
  const acc_t* preds_t;
  const acc_t* weights;
  int64_t m, d, padded, num_labels, offset;
  acc_t w, tau, e;
  bool exp_push, exp0_terms, anchor_in_divisor;
};

// Per-thread rows of `padded` entries: the distances, each term's exponent x (-inf outside the
// sum), its coefficient (0 outside), whether it is a positive (1 or 0), and the shifted terms.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> labels, preds, x, coef, pos, terms;
  explicit Scratch(int64_t padded)
      : labels(padded), preds(padded), x(padded, -std::numeric_limits<acc_t>::infinity()), coef(padded, acc_t(0)),
        pos(padded, acc_t(0)), terms(padded) {}
};

// An anchor's sums: out = |P| / div (log(total) + top - mean_P prod), the mean product taken as
// the positives' mean cosine over tau: |P| log(...) and the sum of their products would each pass
// float32's range at a small tau (|P| / tau) and leave inf - inf where the loss is below 2 / tau.
template <typename acc_t>
struct Anchor {
  acc_t top, total, sum_cos, n_pos, div;
  bool valid;
  acc_t loss(acc_t tau) const {
    return valid ? n_pos / div * ((top + std::log(total)) - sum_cos / n_pos / tau) : acc_t(0);
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

// Per-lane running sums of an anchor's row: the shift (largest exponent), the sum of the
// positives' cosines, and the numbers of positives and negatives (exact in acc_t: m < 2^24).
template <typename acc_t>
struct Lanes {
  acc_t top[kLanes], sum_cos[kLanes], n_pos[kLanes], n_neg[kLanes];
};

// Keys [j0, j0 + n) of anchor i (n <= kLanes, lane t = j - j0): each exponent, coefficient and
// positive flag into the scratch rows, and the lanes' sums. The self pair has a NaN label
// distance (anchor_pass sets it), so it is in neither set. Written without branches, in locals,
// so that the compiler vectorises the lanes.
template <bool kExpPush, typename acc_t>
inline __attribute__((always_inline)) void classify_keys(
    const acc_t* DIRFAST_RESTRICT cosine, const acc_t* DIRFAST_RESTRICT dl, const acc_t* DIRFAST_RESTRICT dp,
    acc_t* DIRFAST_RESTRICT x, acc_t* DIRFAST_RESTRICT coef, acc_t* DIRFAST_RESTRICT pos, int64_t n, acc_t inv_tau,
    acc_t w, acc_t e, acc_t weight, acc_t* DIRFAST_RESTRICT top, acc_t* DIRFAST_RESTRICT sum_cos,
    acc_t* DIRFAST_RESTRICT n_pos, acc_t* DIRFAST_RESTRICT n_neg) {
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const acc_t prod = cosine[t] * inv_tau;
    const acc_t l = dl[t];
    const bool is_pos = l <= w;
    const bool is_neg = (l > w) & (dp[t] <= w);
    const acc_t coef_neg = kExpPush ? weight : weight * (e * l);
    const acc_t x_neg = kExpPush ? prod + e * l : prod;
    const bool member_neg = is_neg & (coef_neg != acc_t(0));
    const acc_t xj = is_pos ? prod : (member_neg ? x_neg : minus_inf);
    const acc_t p = is_pos ? acc_t(1) : acc_t(0);
    x[t] = xj;
    coef[t] = is_pos ? acc_t(1) : (member_neg ? coef_neg : acc_t(0));
    pos[t] = p;
    top[t] = xj > top[t] ? xj : top[t];
    sum_cos[t] += is_pos ? cosine[t] : acc_t(0);
    n_pos[t] += p;
    n_neg[t] += is_neg ? acc_t(1) : acc_t(0);
  }
}

template <bool kExpPush, typename acc_t>
inline __attribute__((always_inline)) void classify_row(const acc_t* cosine, const acc_t* dl, const acc_t* dp,
                                                        acc_t* x, acc_t* coef, acc_t* pos, int64_t m, acc_t inv_tau,
                                                        acc_t w, acc_t e, acc_t weight, Lanes<acc_t>& lanes) {
  acc_t top[kLanes], sum_cos[kLanes], n_pos[kLanes], n_neg[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    top[t] = -std::numeric_limits<acc_t>::infinity();
    sum_cos[t] = n_pos[t] = n_neg[t] = acc_t(0);
  }
  int64_t j0 = 0;
  for (; j0 + kLanes <= m; j0 += kLanes) {
    classify_keys<kExpPush>(cosine + j0, dl + j0, dp + j0, x + j0, coef + j0, pos + j0, kLanes, inv_tau, w, e, weight,
                            top, sum_cos, n_pos, n_neg);
  }
  classify_keys<kExpPush>(cosine + j0, dl + j0, dp + j0, x + j0, coef + j0, pos + j0, m - j0, inv_tau, w, e, weight,
                          top, sum_cos, n_pos, n_neg);
  for (int64_t t = 0; t < kLanes; ++t) {
    lanes.top[t] = top[t];
    lanes.sum_cos[t] = sum_cos[t];
    lanes.n_pos[t] = n_pos[t];
    lanes.n_neg[t] = n_neg[t];
  }
}

// float32: the same, 8 keys per GCC vector (lanes 8..15 of `lanes` stay neutral).
template <bool kExpPush>
inline __attribute__((always_inline)) void classify_row_vf(const float* cosine, const float* dl, const float* dp,
                                                           float* x, float* coef, float* pos, int64_t m, float inv_tau,
                                                           float w, float e, float weight, Lanes<float>& lanes) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  vf top = splat(minus_inf), sum_cos = splat(0.0f), n_pos = splat(0.0f), n_neg = splat(0.0f);
  const vf one = splat(1.0f), zero = splat(0.0f), none = splat(minus_inf);
  int64_t j0 = 0;
  for (; j0 + kVec <= m; j0 += kVec) {
    const vf cos = load_vf(cosine + j0), prod = cos * inv_tau;
    const vf l = load_vf(dl + j0);
    const vi is_pos = l <= w;
    const vi is_neg = (l > w) & (load_vf(dp + j0) <= w);
    const vf coef_neg = kExpPush ? splat(weight) : weight * (e * l);
    const vf x_neg = kExpPush ? prod + e * l : prod;
    const vi member_neg = is_neg & (coef_neg != 0.0f);
    const vf xj = is_pos ? prod : (member_neg ? x_neg : none);
    const vf p = is_pos ? one : zero;
    store_vf(x + j0, xj);
    store_vf(coef + j0, is_pos ? one : (member_neg ? coef_neg : zero));
    store_vf(pos + j0, p);
    top = xj > top ? xj : top;
    sum_cos += is_pos ? cos : zero;
    n_pos += p;
    n_neg += is_neg ? one : zero;
  }
  float lane_top[kLanes], lane_sum[kLanes], lane_pos[kLanes], lane_neg[kLanes];
  for (int64_t t = kVec; t < kLanes; ++t) {
    lane_top[t] = minus_inf;
    lane_sum[t] = lane_pos[t] = lane_neg[t] = 0.0f;
  }
  store_vf(lane_top, top);
  store_vf(lane_sum, sum_cos);
  store_vf(lane_pos, n_pos);
  store_vf(lane_neg, n_neg);
  classify_keys<kExpPush>(cosine + j0, dl + j0, dp + j0, x + j0, coef + j0, pos + j0, m - j0, inv_tau, w, e, weight,
                          lane_top, lane_sum, lane_pos, lane_neg);
  for (int64_t t = 0; t < kLanes; ++t) {
    lanes.top[t] = lane_top[t];
    lanes.sum_cos[t] = lane_sum[t];
    lanes.n_pos[t] = lane_pos[t];
    lanes.n_neg[t] = lane_neg[t];
  }
}

// One function per type and push, cloned for AVX-512 / AVX2 / the baseline.
#define DIRFAST_CLASSIFY(NAME, T, ROW, EXP_PUSH)                                                         \
  DIRFAST_CLONES DIRFAST_NOINLINE void NAME(const T* cosine, const T* dl, const T* dp, T* x, T* coef, T* pos, \
                                            int64_t m, T inv_tau, T w, T e, T weight, Lanes<T>& lanes) { \
    ROW<EXP_PUSH>(cosine, dl, dp, x, coef, pos, m, inv_tau, w, e, weight, lanes);                       \
  }
DIRFAST_CLASSIFY(classify_exp, float, classify_row_vf, true)
DIRFAST_CLASSIFY(classify_linear, float, classify_row_vf, false)
DIRFAST_CLASSIFY(classify_exp, double, classify_row, true)
DIRFAST_CLASSIFY(classify_linear, double, classify_row, false)
#undef DIRFAST_CLASSIFY

// The anchor a's pass: fills the scratch rows and returns its sums.
template <typename acc_t>
Anchor<acc_t> anchor_pass(const Problem<acc_t>& pb, int64_t a, Scratch<acc_t>& s) {
  const int64_t i = pb.offset + a;
  l1_row(pb.labels_t, pb.num_labels, pb.m, i, s.labels.data());
  l1_row(pb.preds_t, pb.num_labels, pb.m, i, s.preds.data());
  s.labels[i] = std::numeric_limits<acc_t>::quiet_NaN();  // the anchor is never its own partner
  Lanes<acc_t> lanes;
  using Classify = void (*)(const acc_t*, const acc_t*, const acc_t*, acc_t*, acc_t*, acc_t*, int64_t, acc_t, acc_t,
                            acc_t, acc_t, Lanes<acc_t>&);
  const Classify classify = pb.exp_push ? static_cast<Classify>(classify_exp) : static_cast<Classify>(classify_linear);
  classify(pb.cosine + a * pb.m, s.labels.data(), s.preds.data(), s.x.data(), s.coef.data(), s.pos.data(), pb.m,
           acc_t(1) / pb.tau, pb.w, pb.e, pb.weights[i], lanes);
  Anchor<acc_t> r{};
  r.top = -std::numeric_limits<acc_t>::infinity();
  r.sum_cos = acc_t(0);
  acc_t pos_count = 0, neg_count = 0;
  for (int64_t t = 0; t < kLanes; ++t) {
    r.top = lanes.top[t] > r.top ? lanes.top[t] : r.top;
    r.sum_cos += lanes.sum_cos[t];
    pos_count += lanes.n_pos[t];
    neg_count += lanes.n_neg[t];
  }
  if (pb.exp0_terms && r.top < acc_t(0)) r.top = acc_t(0);  // the exp(0) terms
  if (r.top == -std::numeric_limits<acc_t>::infinity()) r.top = acc_t(0);
  r.total = sum_terms(s.x.data(), s.coef.data(), r.top, pb.padded, s.terms.data());
  if (pb.exp0_terms) r.total += (static_cast<acc_t>(pb.m) - pos_count) * std::exp(-r.top);
  r.n_pos = pos_count;
  r.div = r.n_pos + (pb.anchor_in_divisor ? acc_t(1) : acc_t(0));
  r.valid = pos_count > 0 && neg_count > 0;
  return r;
}

// About 64k pair evaluations per task: a small batch runs on one thread.
int64_t grain_rows(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(m, 1)); }

template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, int64_t count, acc_t* out) {
  parallel_for_pieces(count, grain_rows(pb.m), [&](auto next) {
    Scratch<acc_t> s(pb.padded);
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t a = begin; a < end; ++a) out[a] = anchor_pass(pb, a, s).loss(pb.tau);
    }
  });
}

// Overwrites each cosine row with its coefficients G_aj / tau.
template <typename acc_t>
DIRFAST_NOINLINE void backward_rows(const Problem<acc_t>& pb, int64_t count, const acc_t* grad, acc_t* coefficients) {
  parallel_for_pieces(count, grain_rows(pb.m), [&](auto next) {
    Scratch<acc_t> s(pb.padded);
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t a = begin; a < end; ++a) {
        const Anchor<acc_t> r = anchor_pass(pb, a, s);
        acc_t* row = coefficients + a * pb.m;
        if (!r.valid) {
          std::fill(row, row + pb.m, acc_t(0));
          continue;
        }
        const acc_t share = grad[a] * (r.n_pos / r.div), minus = grad[a] / r.div;
        write_coefficients(s.terms.data(), s.pos.data(), share, minus, r.total, pb.tau, pb.m, row);
      }
    }
  });
}

// ---------------------------------------------------------------------------- the sparse path
// Only the members of an anchor's sums (its positives, and its negatives of non-zero push) need
// prod_aj: when they are a small share of the pairs, their dot products are computed one by one
// instead of the [count, m] GEMM, and the gradient is a sum over the same pairs.

// Whether key j is in anchor i's sums, from the label and prediction distances (the self pair has
// a NaN label distance: in neither set). One predicate for the count pass and the anchor pass.
template <bool kExpPush, typename acc_t>
inline __attribute__((always_inline)) bool is_member(acc_t l, acc_t p, acc_t w, acc_t e, acc_t weight) {
  const bool is_pos = l <= w;
  const bool is_neg = (l > w) & (p <= w);
  const acc_t coef_neg = kExpPush ? weight : weight * (e * l);
  return is_pos | (is_neg & (coef_neg != acc_t(0)));
}

template <bool kExpPush, typename acc_t>
DIRFAST_NOINLINE int64_t count_members(const acc_t* DIRFAST_RESTRICT dl, const acc_t* DIRFAST_RESTRICT dp,
                                       int64_t m, acc_t w, acc_t e, acc_t weight) {
  int64_t n = 0;
  for (int64_t j = 0; j < m; ++j) n += is_member<kExpPush>(dl[j], dp[j], w, e, weight) ? 1 : 0;
  return n;
}

// The members' keys in order into idx and their label distances into ml; returns how many, and
// the numbers of positives and negatives (negatives of zero push included, as the GEMM path).
template <bool kExpPush, typename acc_t>
DIRFAST_NOINLINE int64_t compact_members(const acc_t* DIRFAST_RESTRICT dl, const acc_t* DIRFAST_RESTRICT dp,
                                         int64_t m, acc_t w, acc_t e, acc_t weight, int32_t* DIRFAST_RESTRICT idx,
                                         acc_t* DIRFAST_RESTRICT ml, acc_t& n_pos, acc_t& n_neg) {
  int64_t k = 0, pos = 0, neg = 0;
  for (int64_t j = 0; j < m; ++j) {
    const acc_t l = dl[j];
    idx[k] = static_cast<int32_t>(j);
    ml[k] = l;
    k += is_member<kExpPush>(l, dp[j], w, e, weight) ? 1 : 0;
    pos += l <= w ? 1 : 0;
    neg += (l > w) & (dp[j] <= w) ? 1 : 0;
  }
  n_pos = static_cast<acc_t>(pos);
  n_neg = static_cast<acc_t>(neg);
  return k;
}

// 32-byte GCC vectors of acc_t for the dot products and the gradient's sums.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
};

template <typename V, typename acc_t>
inline V load_v(const acc_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename acc_t>
inline acc_t hsum(V v) {
  constexpr int64_t n = sizeof(V) / sizeof(acc_t);
  acc_t lanes[n];
  std::memcpy(lanes, &v, sizeof(v));
  acc_t total = 0;
  for (int64_t t = 0; t < n; ++t) total += lanes[t];
  return total;
}

// out[t] = anchor . q[idx[t]] for t < k, four keys at a time (two accumulators each).
template <typename acc_t>
inline __attribute__((always_inline)) void dot_keys_impl(const acc_t* DIRFAST_RESTRICT anchor, const acc_t* q,
                                                         int64_t d, const int32_t* idx, int64_t k,
                                                         acc_t* DIRFAST_RESTRICT out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t n = sizeof(V) / sizeof(acc_t);
  int64_t t = 0;
  for (; t + 4 <= k; t += 4) {
    const acc_t* r[4] = {q + idx[t] * d, q + idx[t + 1] * d, q + idx[t + 2] * d, q + idx[t + 3] * d};
    V s[4][2] = {};
    int64_t c = 0;
    for (; c + 2 * n <= d; c += 2 * n) {
      const V x0 = load_v<V>(anchor + c), x1 = load_v<V>(anchor + c + n);
      for (int u = 0; u < 4; ++u) {
        s[u][0] += x0 * load_v<V>(r[u] + c);
        s[u][1] += x1 * load_v<V>(r[u] + c + n);
      }
    }
    for (int u = 0; u < 4; ++u) {
      acc_t total = hsum<V, acc_t>(s[u][0] + s[u][1]);
      for (int64_t cc = c; cc < d; ++cc) total += anchor[cc] * r[u][cc];
      out[t + u] = total;
    }
  }
  for (; t < k; ++t) {
    const acc_t* r = q + idx[t] * d;
    V s0 = {}, s1 = {};
    int64_t c = 0;
    for (; c + 2 * n <= d; c += 2 * n) {
      s0 += load_v<V>(anchor + c) * load_v<V>(r + c);
      s1 += load_v<V>(anchor + c + n) * load_v<V>(r + c + n);
    }
    acc_t total = hsum<V, acc_t>(s0 + s1);
    for (; c < d; ++c) total += anchor[c] * r[c];
    out[t] = total;
  }
}

// out[c] += sum_t val[t] q[idx[t]][c] over t < k in order, four rows at a time.
template <typename acc_t>
inline __attribute__((always_inline)) void gather_rows_impl(const acc_t* q, int64_t d, const int32_t* idx,
                                                            const acc_t* val, int64_t k, acc_t* DIRFAST_RESTRICT out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t n = sizeof(V) / sizeof(acc_t);
  int64_t t = 0;
  for (; t + 4 <= k; t += 4) {
    const acc_t* r0 = q + idx[t] * d;
    const acc_t* r1 = q + idx[t + 1] * d;
    const acc_t* r2 = q + idx[t + 2] * d;
    const acc_t* r3 = q + idx[t + 3] * d;
    const acc_t v0 = val[t], v1 = val[t + 1], v2 = val[t + 2], v3 = val[t + 3];
    int64_t c = 0;
    for (; c + n <= d; c += n) {
      const V sum = (v0 * load_v<V>(r0 + c) + v1 * load_v<V>(r1 + c)) +
                    (v2 * load_v<V>(r2 + c) + v3 * load_v<V>(r3 + c));
      const V o = load_v<V>(out + c) + sum;
      std::memcpy(out + c, &o, sizeof(o));
    }
    for (; c < d; ++c) out[c] += (v0 * r0[c] + v1 * r1[c]) + (v2 * r2[c] + v3 * r3[c]);
  }
  for (; t < k; ++t) {
    const acc_t* r = q + idx[t] * d;
    const acc_t v = val[t];
    for (int64_t c = 0; c < d; ++c) out[c] += v * r[c];
  }
}

#define DIRFAST_SPARSE_KERNELS(T)                                                                             \
  DIRFAST_CLONES DIRFAST_NOINLINE void dot_keys(const T* anchor, const T* q, int64_t d, const int32_t* idx,  \
                                                int64_t k, T* out) {                                         \
    dot_keys_impl(anchor, q, d, idx, k, out);                                                                 \
  }                                                                                                           \
  DIRFAST_CLONES DIRFAST_NOINLINE void gather_rows(const T* q, int64_t d, const int32_t* idx, const T* val,   \
                                                   int64_t k, T* out) {                                      \
    gather_rows_impl(q, d, idx, val, k, out);                                                                 \
  }
DIRFAST_SPARSE_KERNELS(float)
DIRFAST_SPARSE_KERNELS(double)
#undef DIRFAST_SPARSE_KERNELS

// The members of each anchor's sums (one pass over the masks, no dot products): counts[a].
template <typename acc_t>
int64_t member_counts(const Problem<acc_t>& pb, int64_t count, int64_t* counts) {
  parallel_for_pieces(count, grain_rows(pb.m), [&](auto next) {
    std::vector<acc_t> dl(pb.m), dp(pb.m);
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t a = begin; a < end; ++a) {
        const int64_t i = pb.offset + a;
        l1_row(pb.labels_t, pb.num_labels, pb.m, i, dl.data());
        l1_row(pb.preds_t, pb.num_labels, pb.m, i, dp.data());
        dl[i] = std::numeric_limits<acc_t>::quiet_NaN();
        counts[a] = pb.exp_push ? count_members<true>(dl.data(), dp.data(), pb.m, pb.w, pb.e, pb.weights[i])
                                : count_members<false>(dl.data(), dp.data(), pb.m, pb.w, pb.e, pb.weights[i]);
      }
    }
  });
  int64_t total = 0;
  for (int64_t a = 0; a < count; ++a) total += counts[a];
  return total;
}

// The sparse path's scratch rows (padded entries): the distances, the members' keys and label
// distances, and each member's exponent, coefficient, positive flag and shifted term.
template <typename acc_t>
struct SparseScratch {
  std::vector<acc_t> labels, preds, ml, x, coef, pos, terms;
  std::vector<int32_t> idx;
  explicit SparseScratch(int64_t padded)
      : labels(padded), preds(padded), ml(padded), x(padded), coef(padded), pos(padded), terms(padded),
        idx(padded) {}
};

// The anchor a's pass over its members only: the same sums as anchor_pass, the member keys in
// s.idx[0, k) and their terms and positive flags in s.terms / s.pos.
template <typename acc_t>
Anchor<acc_t> sparse_anchor_pass(const Problem<acc_t>& pb, int64_t a, SparseScratch<acc_t>& s, int64_t& k) {
  const int64_t i = pb.offset + a;
  l1_row(pb.labels_t, pb.num_labels, pb.m, i, s.labels.data());
  l1_row(pb.preds_t, pb.num_labels, pb.m, i, s.preds.data());
  s.labels[i] = std::numeric_limits<acc_t>::quiet_NaN();  // the anchor is never its own partner
  const acc_t weight = pb.weights[i], w = pb.w, e = pb.e, inv_tau = acc_t(1) / pb.tau;
  acc_t pos_count, neg_count;
  k = pb.exp_push ? compact_members<true>(s.labels.data(), s.preds.data(), pb.m, w, e, weight, s.idx.data(),
                                          s.ml.data(), pos_count, neg_count)
                  : compact_members<false>(s.labels.data(), s.preds.data(), pb.m, w, e, weight, s.idx.data(),
                                           s.ml.data(), pos_count, neg_count);
  dot_keys(pb.q + i * pb.d, pb.q, pb.d, s.idx.data(), k, s.x.data());
  Anchor<acc_t> r{};
  r.top = -std::numeric_limits<acc_t>::infinity();
  r.sum_cos = acc_t(0);
  for (int64_t t = 0; t < k; ++t) {
    const acc_t cos = s.x[t], prod = cos * inv_tau;
    const acc_t l = s.ml[t];
    const bool is_pos = l <= w;
    const acc_t xt = is_pos ? prod : (pb.exp_push ? prod + e * l : prod);
    s.x[t] = xt;
    s.coef[t] = is_pos ? acc_t(1) : (pb.exp_push ? weight : weight * (e * l));
    s.pos[t] = is_pos ? acc_t(1) : acc_t(0);
    r.top = xt > r.top ? xt : r.top;
    r.sum_cos += is_pos ? cos : acc_t(0);
  }
  const int64_t padded = (k + kLanes - 1) / kLanes * kLanes;
  for (int64_t t = k; t < padded; ++t) {
    s.x[t] = -std::numeric_limits<acc_t>::infinity();
    s.coef[t] = acc_t(0);
  }
  if (pb.exp0_terms && r.top < acc_t(0)) r.top = acc_t(0);  // the exp(0) terms
  if (r.top == -std::numeric_limits<acc_t>::infinity()) r.top = acc_t(0);
  r.total = sum_terms(s.x.data(), s.coef.data(), r.top, padded, s.terms.data());
  if (pb.exp0_terms) r.total += (static_cast<acc_t>(pb.m) - pos_count) * std::exp(-r.top);
  r.n_pos = pos_count;
  r.div = r.n_pos + (pb.anchor_in_divisor ? acc_t(1) : acc_t(0));
  r.valid = pos_count > 0 && neg_count > 0;
  return r;
}

template <typename acc_t>
DIRFAST_NOINLINE void sparse_forward_rows(const Problem<acc_t>& pb, int64_t count, acc_t* out) {
  parallel_for_pieces(count, grain_rows(pb.m), [&](auto next) {
    SparseScratch<acc_t> s(pb.padded);
    int64_t k;
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t a = begin; a < end; ++a) out[a] = sparse_anchor_pass(pb, a, s, k).loss(pb.tau);
    }
  });
}

// grad_q = H q with H[r][c] = G(r, c) + G(c, r) over the member pairs only: each anchor's
// coefficients G_aj / tau as rows (offsets[a] .. offsets[a + 1] of keys / values, keys in
// order), transposed by a counting sort (anchors in order), then per row of q its own row's sum
// and its column's, in that fixed order.
template <typename acc_t>
DIRFAST_NOINLINE void sparse_backward(const Problem<acc_t>& pb, int64_t count, const int64_t* offsets,
                                      const acc_t* grad, acc_t* grad_q) {
  const int64_t m = pb.m, d = pb.d, nnz = offsets[count];
  std::vector<int32_t> keys(nnz), anchors(nnz);
  std::vector<acc_t> values(nnz), values_t(nnz);
  parallel_for_pieces(count, grain_rows(pb.m), [&](auto next) {
    SparseScratch<acc_t> s(pb.padded);
    int64_t k;
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t a = begin; a < end; ++a) {
        const Anchor<acc_t> r = sparse_anchor_pass(pb, a, s, k);
        const int64_t o = offsets[a];
        const int64_t n = std::min(k, offsets[a + 1] - o);  // k == counts[a]: the same predicate
        std::copy(s.idx.data(), s.idx.data() + n, keys.data() + o);
        if (!r.valid) {
          std::fill(values.data() + o, values.data() + o + n, acc_t(0));
          continue;
        }
        const acc_t share = grad[a] * (r.n_pos / r.div), minus = grad[a] / r.div;
        write_coefficients(s.terms.data(), s.pos.data(), share, minus, r.total, pb.tau, n, values.data() + o);
      }
    }
  });
  std::vector<int64_t> column(m + 1, 0);
  for (int64_t t = 0; t < nnz; ++t) ++column[keys[t] + 1];
  for (int64_t r = 0; r < m; ++r) column[r + 1] += column[r];
  {
    std::vector<int64_t> next(column.begin(), column.end() - 1);
    for (int64_t a = 0; a < count; ++a) {
      for (int64_t t = offsets[a]; t < offsets[a + 1]; ++t) {
        const int64_t slot = next[keys[t]]++;
        anchors[slot] = static_cast<int32_t>(pb.offset + a);
        values_t[slot] = values[t];
      }
    }
  }
  parallel_for_ranges(m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      acc_t* out = grad_q + r * d;
      std::fill(out, out + d, acc_t(0));
      const int64_t a = r - pb.offset;
      if (a >= 0 && a < count) {
        gather_rows(pb.q, d, keys.data() + offsets[a], values.data() + offsets[a], offsets[a + 1] - offsets[a], out);
      }
      gather_rows(pb.q, d, anchors.data() + column[r], values_t.data() + column[r], column[r + 1] - column[r], out);
    }
  });
}

// ---------------------------------------------------------------------------- rows of q
// q = z / max(||z||, eps) per row (acc, contiguous [m, D]); the norms into `norms`.
template <typename T, typename acc_t>
DIRFAST_NOINLINE void normalize_rows(const T* z, int64_t m, int64_t d, acc_t* q, acc_t* norms) {
  parallel_for_ranges(m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
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
  parallel_for_ranges(m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
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
// that is no anchor): grad_q = H q. The transposed reads go a kTile x kTile tile at a time.
constexpr int64_t kTile = 32;

template <typename acc_t>
DIRFAST_NOINLINE void symmetrize(const acc_t* g, int64_t m, int64_t offset, int64_t count, acc_t* h) {
  const int64_t tiles = (m + kTile - 1) / kTile;
  parallel_for_ranges(tiles, std::max<int64_t>(1, 512 / std::max<int64_t>(m, 1)), [&](int64_t b, int64_t e) {
    for (int64_t rb = b * kTile; rb < std::min(m, e * kTile); rb += kTile) {
      const int64_t r_end = std::min(m, rb + kTile);
      for (int64_t r = rb; r < r_end; ++r) {
        acc_t* hr = h + r * m;
        if (r >= offset && r < offset + count) {
          std::copy(g + (r - offset) * m, g + (r - offset + 1) * m, hr);
        } else {
          std::fill(hr, hr + m, acc_t(0));
        }
      }
      for (int64_t cb = offset; cb < offset + count; cb += kTile) {
        const int64_t c_end = std::min(offset + count, cb + kTile);
        for (int64_t r = rb; r < r_end; ++r) {
          acc_t* hr = h + r * m;
          for (int64_t c = cb; c < c_end; ++c) hr[c] += g[(c - offset) * m + r];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- the ops
inline Tensor mm(const Tensor& a, const Tensor& b) {
  using torch::stable::detail::from;
  return call_aten<2>("aten::mm", "", {from(a), from(b)});
}

// The path, chosen by the members' share of the count x m pairs (counted in one pass over the
// masks): the sparse path at most kSparseDensity, the GEMM path above. The two cost the same a
// little above it (benchmarks/results/cpu/design-constants.md): one dot product and two gradient
// sums per member against three GEMMs over all pairs. The margin keeps the GEMM path where they
// are close. (Published ConR batches, integer ages and w = 1, have few members.)
constexpr double kSparseDensity = 0.2;

// The normalised rows (acc, [m, D]), their norms ([m]), the transposed labels and predictions
// ([L, m], acc) and the weights, all contiguous in acc; the cosine rows of the anchors ([count,
// m]) only on the GEMM path.
struct Prepared {
  Tensor q, norms, labels_t, preds_t, weights, cosine;
  bool sparse;
  std::vector<int64_t> offsets;  // the sparse path's member rows: anchor a's are offsets[a] .. [a + 1]
};

template <typename acc_t>
Problem<acc_t> problem(const Prepared& p, int64_t m, int64_t offset, double w, double tau, double e, bool exp_push,
                       bool exp0_terms, bool anchor_in_divisor) {
  return {p.sparse ? nullptr : p.cosine.const_data_ptr<acc_t>(), p.q.const_data_ptr<acc_t>(),
          p.labels_t.const_data_ptr<acc_t>(), p.preds_t.const_data_ptr<acc_t>(), p.weights.const_data_ptr<acc_t>(),
          m, p.q.size(1), (m + kLanes - 1) / kLanes * kLanes, p.labels_t.size(0), offset, static_cast<acc_t>(w),
          static_cast<acc_t>(tau), static_cast<acc_t>(e), exp_push, exp0_terms, anchor_in_divisor};
}

// Normalises the rows, counts the members of every anchor's sums (one pass over the masks) and
// picks the path by their density; the GEMM path's cosine rows.
Prepared prepare(const Tensor& features, const Tensor& labels, const Tensor& preds, const Tensor& weights,
                 ScalarType acc, int64_t offset, int64_t count, double w, double tau, double e, bool exp_push,
                 const char* op) {
  const int64_t m = features.size(0), d = features.size(1);
  Prepared p;
  p.q = empty({m, d}, acc, features);
  p.norms = empty({m}, acc, features);
  const Tensor z = made_contiguous(features);
  p.labels_t = contiguous_as(torch::stable::transpose(labels, 0, 1), acc);
  p.preds_t = contiguous_as(torch::stable::transpose(preds, 0, 1), acc);
  p.weights = contiguous_as(weights, acc);
  p.sparse = true;  // no cosine yet
  int64_t members = 0;
  p.offsets.assign(count + 1, 0);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    dispatch_float(z.scalar_type(), op, [&](auto scalar) {
      using T = decltype(scalar);
      normalize_rows<T, acc_t>(z.const_data_ptr<T>(), m, d, p.q.mutable_data_ptr<acc_t>(),
                               p.norms.mutable_data_ptr<acc_t>());
    });
    members = member_counts(problem<acc_t>(p, m, offset, w, tau, e, exp_push, false, false), count,
                            p.offsets.data() + 1);
  });
  p.sparse = static_cast<double>(members) <= kSparseDensity * static_cast<double>(count) * static_cast<double>(m);
  if (p.sparse) {
    for (int64_t a = 0; a < count; ++a) p.offsets[a + 1] += p.offsets[a];
  } else {
    Tensor anchors = torch::stable::narrow(p.q, 0, offset, count);
    p.cosine = torch::stable::contiguous(mm(anchors, torch::stable::transpose(p.q, 0, 1)));
  }
  return p;
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
  const Prepared p = prepare(features, labels, preds, weights, acc, offset, count, w, tau, e, exp_push, op);
  const int64_t m = features.size(0);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb = problem<acc_t>(p, m, offset, w, tau, e, exp_push, exp0_terms, anchor_in_divisor);
    if (p.sparse) {
      sparse_forward_rows(pb, count, out.mutable_data_ptr<acc_t>());
    } else {
      forward_rows(pb, count, out.mutable_data_ptr<acc_t>());
    }
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
  const Prepared p = prepare(features, labels, preds, weights, acc, offset, count, w, tau, e, exp_push, op);
  const Tensor g = contiguous_as(grad, acc);
  Tensor grad_q;
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb = problem<acc_t>(p, m, offset, w, tau, e, exp_push, exp0_terms, anchor_in_divisor);
    if (p.sparse) {
      grad_q = empty({m, d}, acc, features);
      sparse_backward(pb, count, p.offsets.data(), g.const_data_ptr<acc_t>(), grad_q.mutable_data_ptr<acc_t>());
    } else {
      Tensor coefficients = p.cosine;  // overwritten row by row
      backward_rows(pb, count, g.const_data_ptr<acc_t>(), coefficients.mutable_data_ptr<acc_t>());
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
    }
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
