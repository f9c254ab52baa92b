// dirfast::rnc_loss on CPU: the Rank-N-Contrast loss of each anchor row against all m rows, and
// its gradient in the features, in O(m^2 log m + m^2 D) time and O(m) memory per anchor (the
// backward O(count m) in all).
//
// Per anchor i (one task each, rows computed independently): the exact distances r_k =
// ||z_i - z_k|| (a vectorised difference norm, so identical rows are exactly 0 apart), logits
// s_k = -r_k / t, the L1 label distances d_k, and the keys k != i in order of d_k (with one finite
// label, a merge outwards from i in the rows' label order, sorted once; else a sort by (d_k, k)). Walking the
// sorted keys from the end, one tie group at a time, a running log-sum-exp (rescaled whenever the
// maximum grows: no temperature overflows or underflows it) gives log S of the group, shared by
// its members; out = -1/(m-1) sum_k (s_k - log S_k).
// The backward recomputes that, then walks the groups from the start with a running log-sum-exp
// of -log S (the prefix sums sum_{j: d_j <= d_k} 1 / S_j), giving dL/ds_k = c (exp(s_k) P_k - 1)
// with c = grad / (m - 1), and the weights w_k = dL/ds_k / (t r_k) (0 where r_k = 0) into a
// [count, m] matrix. A second pass over the m rows adds, in a fixed order, sum_p b_rp (z_p - z_r)
// with b_rp = w[r][p] + w[p][r]: the anchor's and the keys' shares. Every sum has an order fixed
// by the inputs, so the bits do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

namespace dirfast {
namespace cpu {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
#define DIRFAST_RNC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIRFAST_RNC_CLONES
#endif

// ---------------------------------------------------------------------------- checks
// features [m, D] and labels [m, L >= 1], floating, on the CPU; temperature finite > 0; the
// anchors offset .. offset + count - 1 within the m rows.
void check_rnc_args(const Tensor& features, const Tensor& labels, double temperature, int64_t offset,
                    int64_t count, const char* op) {
  check_device_type(features, "features", op, torch::headeronly::DeviceType::CPU);
  check_same_device(labels, "labels", features, "features", op);
  check_float(features, "features", op);
  check_float(labels, "labels", op);
  STD_TORCH_CHECK(features.dim() == 2, op, ": features must be [m, D], got shape ", shape_of(features));
  const int64_t m = features.size(0);
  STD_TORCH_CHECK(labels.dim() == 2 && labels.size(0) == m && labels.size(1) >= 1, op,
                  ": labels must be [m, L] with m = ", m, " (the rows of features) and L >= 1, got shape ",
                  shape_of(labels));
  STD_TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
                  ": temperature must be a finite number > 0, got ", temperature);
  STD_TORCH_CHECK(offset >= 0 && offset <= m, op, ": offset must be in [0, ", m, "] (the rows of features), got ",
                  offset);
  STD_TORCH_CHECK(count >= 0 && count <= m - offset, op, ": count must be in [0, ", m - offset,
                  "] (offset + count <= ", m, " rows), got ", count);
}

// ---------------------------------------------------------------------------- distances
// out[k] = ||zi - Z[k]|| for the m rows of Z [m, D]: four rows at a time against one load of zi,
// the squares summed in 32-byte vectors (8 floats or 4 doubles: one AVX register), the lanes then
// added in a fixed order, the tail element by element (every clone computes the same bits).
template <typename T>
struct Lanes {
  static constexpr int64_t n = 32 / sizeof(T);
  typedef T vec __attribute__((vector_size(32), aligned(sizeof(T))));
};

template <typename T>
__attribute__((always_inline)) inline typename Lanes<T>::vec load(const T* p) {
  typename Lanes<T>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The squared norm: the lanes of acc in order, then the tail D % lanes of (zi - zk).
template <typename T>
__attribute__((always_inline)) inline T finish(typename Lanes<T>::vec acc, const T* zi, const T* zk, int64_t full,
                                               int64_t D) {
  T lanes[Lanes<T>::n];
  std::memcpy(lanes, &acc, sizeof(acc));
  T total = 0;
  for (int64_t t = 0; t < Lanes<T>::n; ++t) total += lanes[t];
  for (int64_t j = full; j < D; ++j) {
    const T diff = zi[j] - zk[j];
    total += diff * diff;
  }
  return std::sqrt(total);
}

template <typename T>
__attribute__((always_inline)) inline void distances_body(const T* zi, const T* Z, int64_t m, int64_t D, T* out) {
  using V = typename Lanes<T>::vec;
  constexpr int64_t n = Lanes<T>::n;
  const int64_t full = D - D % n;
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    const T* z0 = Z + k * D;
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t j = 0; j < full; j += n) {
      const V x = load(zi + j);
      const V d0 = x - load(z0 + j), d1 = x - load(z0 + D + j), d2 = x - load(z0 + 2 * D + j),
              d3 = x - load(z0 + 3 * D + j);
      a0 += d0 * d0;
      a1 += d1 * d1;
      a2 += d2 * d2;
      a3 += d3 * d3;
    }
    out[k] = finish<T>(a0, zi, z0, full, D);
    out[k + 1] = finish<T>(a1, zi, z0 + D, full, D);
    out[k + 2] = finish<T>(a2, zi, z0 + 2 * D, full, D);
    out[k + 3] = finish<T>(a3, zi, z0 + 3 * D, full, D);
  }
  for (; k < m; ++k) {
    const T* zk = Z + k * D;
    V acc{};
    for (int64_t j = 0; j < full; j += n) {
      const V diff = load(zi + j) - load(zk + j);
      acc += diff * diff;
    }
    out[k] = finish<T>(acc, zi, zk, full, D);
  }
}

DIRFAST_RNC_CLONES DIRFAST_NOINLINE void distances(const float* zi, const float* Z, int64_t m, int64_t D,
                                                   float* out) {
  distances_body(zi, Z, m, D, out);
}

DIRFAST_RNC_CLONES DIRFAST_NOINLINE void distances(const double* zi, const double* Z, int64_t m, int64_t D,
                                                   double* out) {
  distances_body(zi, Z, m, D, out);
}

// ---------------------------------------------------------------------------- one anchor
template <typename acc_t>
struct Key {
  acc_t d;
  int64_t k;
};

// The inputs in the arithmetic type: features Z [m, D], labels Y [m, L]; with one label (L = 1)
// and every label finite, the rows in label order (by_label) and each row's place in it, so that
// a row's keys come sorted by label distance from a merge instead of a sort.
template <typename acc_t>
struct Problem {
  const acc_t* Z;
  const acc_t* Y;
  int64_t m, D, L;
  acc_t temperature;
  std::vector<int64_t> by_label, place;

  Problem(const acc_t* z, const acc_t* y, int64_t m_, int64_t d, int64_t l, acc_t t)
      : Z(z), Y(y), m(m_), D(d), L(l), temperature(t) {
    if (L != 1) return;
    for (int64_t k = 0; k < m; ++k) {
      if (!std::isfinite(Y[k])) return;
    }
    by_label.resize(m);
    place.resize(m);
    for (int64_t k = 0; k < m; ++k) by_label[k] = k;
    std::sort(by_label.begin(), by_label.end(),
              [&](int64_t a, int64_t b) { return Y[a] < Y[b] || (Y[a] == Y[b] && a < b); });
    for (int64_t q = 0; q < m; ++q) place[by_label[q]] = q;
  }
};

// The scratch of one thread, for rows of m keys.
template <typename acc_t>
struct Row {
  std::vector<acc_t> r, s, log_s;
  std::vector<Key<acc_t>> keys;
  explicit Row(int64_t m) : r(m), s(m), log_s(m), keys(m) {}
};

// A running log-sum-exp: value = top + log(sum). add(v) keeps sum's terms <= 1 (rescaled when
// the maximum grows), so nothing overflows or underflows; -inf adds nothing, NaN makes it NaN.
template <typename acc_t>
struct RunningLse {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  void add(acc_t v, acc_t times) {
    if (v > top) {
      sum = sum * std::exp(top - v) + times;
      top = v;
    } else if (!(v == -std::numeric_limits<acc_t>::infinity())) {
      sum += times * std::exp(v - top);  // NaN v (or top) gives NaN
    }
  }
  acc_t value() const { return top + std::log(sum); }
};

// The keys k != i of anchor i in order of label distance d_k = sum_l |y_il - y_kl| (summed in label
// order, as every kernel does, so ties are exact ties), NaN distances last. With one finite label:
// a merge of the rows below i and above i in label order, outwards (O(m)); else a sort by (d, k).
template <typename acc_t>
void sort_keys(const Problem<acc_t>& pb, int64_t i, Key<acc_t>* keys) {
  const acc_t* yi = pb.Y + i * pb.L;
  if (!pb.by_label.empty()) {
    int64_t below = pb.place[i] - 1, above = pb.place[i] + 1, n = 0;
    while (below >= 0 || above < pb.m) {
      const int64_t kb = below >= 0 ? pb.by_label[below] : -1, ka = above < pb.m ? pb.by_label[above] : -1;
      const acc_t db = kb >= 0 ? std::abs(yi[0] - pb.Y[kb]) : std::numeric_limits<acc_t>::infinity();
      const acc_t da = ka >= 0 ? std::abs(yi[0] - pb.Y[ka]) : std::numeric_limits<acc_t>::infinity();
      if (ka < 0 || (kb >= 0 && db <= da)) {
        keys[n++] = Key<acc_t>{db, kb};
        --below;
      } else {
        keys[n++] = Key<acc_t>{da, ka};
        ++above;
      }
    }
    return;
  }
  int64_t n = 0;
  for (int64_t k = 0; k < pb.m; ++k) {
    if (k == i) continue;
    const acc_t* yk = pb.Y + k * pb.L;
    acc_t d = std::abs(yi[0] - yk[0]);
    for (int64_t l = 1; l < pb.L; ++l) d += std::abs(yi[l] - yk[l]);
    keys[n++] = Key<acc_t>{d, k};
  }
  std::sort(keys, keys + n, [](const Key<acc_t>& a, const Key<acc_t>& b) {
    if (a.d < b.d) return true;
    if (b.d < a.d) return false;
    const bool nan_a = std::isnan(a.d), nan_b = std::isnan(b.d);
    if (nan_a != nan_b) return nan_b;  // a total order: NaN after every number
    return a.k < b.k;
  });
}

// For anchor row i: the distances r, logits s, the keys sorted by label distance, and log S of
// each sorted key (shared by its tie group). A pair whose label distance is NaN gets a NaN
// distance, so a NaN label makes every loss it reaches NaN. Returns the number of keys, m - 1.
template <typename acc_t>
DIRFAST_NOINLINE int64_t sorted_row(const Problem<acc_t>& pb, int64_t i, Row<acc_t>& row) {
  distances(pb.Z + i * pb.D, pb.Z, pb.m, pb.D, row.r.data());
  for (int64_t k = 0; k < pb.m; ++k) row.s[k] = -row.r[k] / pb.temperature;
  sort_keys(pb, i, row.keys.data());
  const int64_t n = pb.m - 1;
  for (int64_t p = n - 1; p >= 0 && std::isnan(row.keys[p].d); --p) {  // a NaN label: the pair's distance is NaN
    row.r[row.keys[p].k] = row.s[row.keys[p].k] = std::numeric_limits<acc_t>::quiet_NaN();
  }
  // From the end, a tie group at a time: S of a group is the sum over it and every key after it.
  RunningLse<acc_t> suffix;
  for (int64_t end = n; end > 0;) {
    int64_t start = end - 1;
    while (start > 0 && row.keys[start - 1].d == row.keys[end - 1].d) --start;
    for (int64_t p = end - 1; p >= start; --p) suffix.add(row.s[row.keys[p].k], acc_t(1));
    const acc_t log_s = suffix.value();
    for (int64_t p = start; p < end; ++p) row.log_s[p] = log_s;
    end = start;
  }
  return n;
}

template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, acc_t* out, int64_t offset, int64_t count,
                                   int64_t grain) {
  torch::stable::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    Row<acc_t> row(pb.m);
    for (int64_t a = first; a < last; ++a) {
      const int64_t n = sorted_row(pb, offset + a, row);
      acc_t total = 0;
      for (int64_t p = 0; p < n; ++p) total += row.s[row.keys[p].k] - row.log_s[p];
      out[a] = total / -acc_t(n);
    }
  });
}

// Phase 1 of the backward: w[a][k] = dL/ds_k / (t r_k) for anchor a (0 for the anchor itself and
// where r_k = 0), with dL/ds_k = c (exp(s_k) sum_{j: d_j <= d_k} 1 / S_j - 1), c = grad[a] / (m - 1).
template <typename acc_t>
DIRFAST_NOINLINE void backward_weights(const Problem<acc_t>& pb, const acc_t* grad, acc_t* w, int64_t offset,
                                       int64_t count, int64_t grain) {
  const int64_t m = pb.m;
  torch::stable::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    Row<acc_t> row(m);
    for (int64_t a = first; a < last; ++a) {
      const int64_t i = offset + a;
      const int64_t n = sorted_row(pb, i, row);
      const acc_t c = grad[a] / acc_t(n);
      acc_t* wa = w + a * m;
      wa[i] = 0;
      RunningLse<acc_t> prefix;  // log sum of 1 / S_j over the groups so far
      for (int64_t start = 0; start < n;) {
        int64_t end = start + 1;
        while (end < n && row.keys[end].d == row.keys[start].d) ++end;
        prefix.add(-row.log_s[start], acc_t(end - start));  // one S for the whole group
        const acc_t log_p = prefix.value();
        for (int64_t p = start; p < end; ++p) {
          const int64_t k = row.keys[p].k;
          const acc_t ds = c * (std::exp(row.s[k] + log_p) - acc_t(1));
          wa[k] = row.r[k] == 0 ? acc_t(0) : ds / (pb.temperature * row.r[k]);
        }
        start = end;
      }
    }
  });
}

// Phase 2: grad[r] = sum_p b_rp (z_p - z_r), b_rp = w[r][p] (r an anchor) + w[p][r] (p an anchor),
// four partners p at a time in the order of p.
template <typename acc_t>
__attribute__((always_inline)) inline void add_pairs_body(const acc_t* DIRFAST_RESTRICT zr,
                                                          const acc_t* DIRFAST_RESTRICT zp, const acc_t* b,
                                                          int64_t partners, acc_t* DIRFAST_RESTRICT acc, int64_t D) {
  int64_t p = 0;
  for (; p + 4 <= partners; p += 4) {
    const acc_t* z0 = zp + p * D;
    const acc_t b0 = b[p], b1 = b[p + 1], b2 = b[p + 2], b3 = b[p + 3];
    for (int64_t j = 0; j < D; ++j) {
      const acc_t x = zr[j];
      acc[j] += (b0 * (z0[j] - x) + b1 * (z0[D + j] - x)) + (b2 * (z0[2 * D + j] - x) + b3 * (z0[3 * D + j] - x));
    }
  }
  for (; p < partners; ++p) {
    for (int64_t j = 0; j < D; ++j) acc[j] += b[p] * (zp[p * D + j] - zr[j]);
  }
}

DIRFAST_RNC_CLONES DIRFAST_NOINLINE void add_pairs(const float* zr, const float* zp, const float* b, int64_t partners,
                                                   float* acc, int64_t D) {
  add_pairs_body(zr, zp, b, partners, acc, D);
}

DIRFAST_RNC_CLONES DIRFAST_NOINLINE void add_pairs(const double* zr, const double* zp, const double* b,
                                                   int64_t partners, double* acc, int64_t D) {
  add_pairs_body(zr, zp, b, partners, acc, D);
}

template <typename acc_t>
DIRFAST_NOINLINE void backward_rows(const acc_t* Z, const acc_t* w, acc_t* grad, int64_t m, int64_t D,
                                    int64_t offset, int64_t count, int64_t grain) {
  torch::stable::parallel_for(0, m, grain, [&](int64_t first, int64_t last) {
    std::vector<acc_t> b(m);
    for (int64_t r = first; r < last; ++r) {
      acc_t* acc = grad + r * D;
      std::fill(acc, acc + D, acc_t(0));
      const bool anchor = r >= offset && r < offset + count;
      const int64_t lo = anchor ? 0 : offset, hi = anchor ? m : offset + count;  // p where b_rp may be nonzero
      for (int64_t p = lo; p < hi; ++p) {
        acc_t coefficient = anchor ? w[(r - offset) * m + p] : acc_t(0);
        if (p >= offset && p < offset + count) coefficient += w[(p - offset) * m + r];
        b[p - lo] = coefficient;
      }
      add_pairs(Z + r * D, Z + lo * D, b.data(), hi - lo, acc, D);
    }
  });
}

// Rows per task: about 2^15 multiply-adds at least, so small inputs run on one thread.
int64_t grain_for(int64_t m, int64_t D) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, m * (D + 16)));
}

Tensor rnc_loss_cpu(const Tensor& features, const Tensor& labels, double temperature, int64_t offset, int64_t count) {
  const char* op = "dirfast::rnc_loss";
  check_rnc_args(features, labels, temperature, offset, count, op);
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type()});
  Tensor out = torch::stable::new_zeros(features, {count}, acc);
  const int64_t m = features.size(0), D = features.size(1), L = labels.size(1);
  if (count == 0 || m < 2) return out;
  const Tensor z = contiguous_as(features, acc), y = contiguous_as(labels, acc);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb(z.const_data_ptr<acc_t>(), y.const_data_ptr<acc_t>(), m, D, L,
                            static_cast<acc_t>(temperature));
    forward_rows<acc_t>(pb, out.mutable_data_ptr<acc_t>(), offset, count, grain_for(m, D));
  });
  return out;
}

Tensor rnc_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& labels, double temperature,
                             int64_t offset, int64_t count) {
  const char* op = "dirfast::rnc_loss_backward";
  check_rnc_args(features, labels, temperature, offset, count, op);
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == count, op, ": grad must have shape [", count,
                  "] (count), got ", shape_of(grad));
  check_same_device(grad, "grad", features, "features", op);
  check_float(grad, "grad", op);
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type()});
  const int64_t m = features.size(0), D = features.size(1), L = labels.size(1);
  if (count == 0 || m < 2 || D == 0) return torch::stable::new_zeros(features, {m, D});
  const Tensor z = contiguous_as(features, acc), y = contiguous_as(labels, acc), g = contiguous_as(grad, acc);
  Tensor w = torch::stable::new_empty(features, {count, m}, acc);
  Tensor total = torch::stable::new_empty(features, {m, D}, acc);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const acc_t* pz = z.const_data_ptr<acc_t>();
    const Problem<acc_t> pb(pz, y.const_data_ptr<acc_t>(), m, D, L, static_cast<acc_t>(temperature));
    backward_weights<acc_t>(pb, g.const_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>(), offset, count,
                            grain_for(m, D));
    backward_rows<acc_t>(pz, w.const_data_ptr<acc_t>(), total.mutable_data_ptr<acc_t>(), m, D, offset, count,
                         grain_for(m, D));
  });
  return torch::stable::to(total, features.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("rnc_loss", TORCH_BOX(&dirfast::cpu::rnc_loss_cpu));
  m.impl("rnc_loss_backward", TORCH_BOX(&dirfast::cpu::rnc_loss_backward_cpu));
}
