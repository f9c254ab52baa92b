// dirfast::ranksim_loss on CPU: RankSim's per-anchor rank-similarity loss and its blackbox
// backward (dirfast/ops/ranksim_loss.py states the definition), without an [m, m, D] tensor.
//
// The features are normalised once (q = z / max(||z||, 1e-12)) and the kept rows gathered into
// one [M, D] block of keys. Each anchor row is then independent work for one thread: its cosine
// row (dot products four keys at a time over GCC vectors, the same arithmetic for every key, so
// identical rows tie exactly), its label distances, and the ranks of both rows by one std::sort
// each with the (value descending, key index ascending) order -- NaN first -- O(M log M) per
// row. The backward recomputes these, sorts the shifted row C + lambda G, keeps the surrogate
// row dC in a [count, M] buffer, and forms grad_q of the anchors (sum_j dC_aj q_j, per anchor)
// and of the keys (sum_a dC_aj q_a, per key, anchors in order): no sum depends on the threads,
// so any number of threads gives the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "checks.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr double kNormEps = 1e-12;   // F.normalize's eps
constexpr double kLambdaEps = 1e-8;  // the published backward divides by lambda + 1e-8

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
#define RANKSIM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RANKSIM_CLONES
#endif

// features [m, D] and labels [m, L] floating, keep [m] bool, all on the CPU; lambda_val finite
// and > 0; 0 <= offset <= m and 0 <= count <= m - offset.
void check_ranksim_args(const Tensor& features, const Tensor& labels, const Tensor& keep, double lambda_val,
                        int64_t offset, int64_t count, const char* op) {
  check_device_type(features, "features", op, torch::headeronly::DeviceType::CPU);
  check_float(features, "features", op);
  STD_TORCH_CHECK(features.dim() == 2, op, ": features must be [m, D], got shape ", shape_of(features));
  const int64_t m = features.size(0);
  check_same_device(labels, "labels", features, "features", op);
  check_float(labels, "labels", op);
  STD_TORCH_CHECK(labels.dim() == 2 && labels.size(0) == m && labels.size(1) >= 1, op,
                  ": labels must be [m, L] with m = ", m, " (features.shape[0]) and L >= 1, got shape ",
                  shape_of(labels));
  check_same_device(keep, "keep", features, "features", op);
  STD_TORCH_CHECK(keep.scalar_type() == ScalarType::Bool, op, ": keep must be a bool tensor, got ",
                  dtype_name(keep.scalar_type()));
  STD_TORCH_CHECK(keep.dim() == 1 && keep.size(0) == m, op, ": keep must have shape [", m,
                  "] (one flag per row of features), got ", shape_of(keep));
  STD_TORCH_CHECK(std::isfinite(lambda_val) && lambda_val > 0, op, ": lambda_val must be a finite real > 0, got ",
                  lambda_val);
  STD_TORCH_CHECK(offset >= 0 && offset <= m, op, ": offset must be in [0, ", m, "] (m = features.shape[0]), got ",
                  offset);
  STD_TORCH_CHECK(count >= 0 && count <= m - offset, op, ": count must be in [0, ", m - offset,
                  "] (m - offset), got ", count);
}

// ---------------------------------------------------------------------------- dot products
// out[p] = a . keys[p] for p < n (keys [n, D] row-major), four keys at a time: a vector
// accumulator per key, summed lane by lane in order, then the tail. A last group of fewer than
// four keys repeats its last key (computed and dropped), so every key gets the same arithmetic.
typedef float vf8 __attribute__((vector_size(8 * sizeof(float)), aligned(4)));
typedef double vd4 __attribute__((vector_size(4 * sizeof(double)), aligned(8)));

template <typename V, typename T>
inline V load_v(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename T, int W>
inline void dots_impl(const T* a, const T* keys, int64_t d_size, int64_t n, T* out) {
  for (int64_t p = 0; p < n; p += 4) {
    const T* k[4];
    for (int t = 0; t < 4; ++t) k[t] = keys + std::min(p + t, n - 1) * d_size;
    V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
    int64_t d = 0;
    for (; d + W <= d_size; d += W) {
      const V va = load_v<V>(a + d);
      s0 += va * load_v<V>(k[0] + d);
      s1 += va * load_v<V>(k[1] + d);
      s2 += va * load_v<V>(k[2] + d);
      s3 += va * load_v<V>(k[3] + d);
    }
    T r[4] = {0, 0, 0, 0};
    for (int lane = 0; lane < W; ++lane) {
      r[0] += s0[lane];
      r[1] += s1[lane];
      r[2] += s2[lane];
      r[3] += s3[lane];
    }
    for (; d < d_size; ++d) {
      for (int t = 0; t < 4; ++t) r[t] += a[d] * k[t][d];
    }
    for (int t = 0; t < 4 && p + t < n; ++t) out[p + t] = r[t];
  }
}

RANKSIM_CLONES void dots(const float* a, const float* keys, int64_t d_size, int64_t n, float* out) {
  dots_impl<vf8, float, 8>(a, keys, d_size, n, out);
}

RANKSIM_CLONES void dots(const double* a, const double* keys, int64_t d_size, int64_t n, double* out) {
  dots_impl<vd4, double, 4>(a, keys, d_size, n, out);
}

// ---------------------------------------------------------------------------- ranks
// rank[p] = the 0-based position of v[p] in the order (value descending, NaN first, then index
// ascending): each value becomes an unsigned key that sorts ascending in that order (-0 as +0,
// every NaN as one NaN above +inf), so the sort compares integers: a strict total order, also
// with NaN. float32: key and index packed in one uint64; float64: a (key, index) pair.
inline uint32_t descending_bits(float v) {
  if (std::isnan(v)) v = std::numeric_limits<float>::quiet_NaN();
  v = v + 0.0f;  // -0 -> +0
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return ~((b & 0x80000000u) ? ~b : (b | 0x80000000u));
}

inline uint64_t descending_bits(double v) {
  if (std::isnan(v)) v = std::numeric_limits<double>::quiet_NaN();
  v = v + 0.0;
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return ~((b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull));
}

struct SortScratch {
  std::vector<uint64_t> packed;                       // float32
  std::vector<std::pair<uint64_t, int32_t>> pairs;   // float64
};

DIRFAST_NOINLINE void descending_ranks(const float* v, int64_t n, SortScratch& scratch, int32_t* rank) {
  scratch.packed.resize(n);
  for (int64_t p = 0; p < n; ++p) scratch.packed[p] = (uint64_t(descending_bits(v[p])) << 32) | uint64_t(p);
  std::sort(scratch.packed.begin(), scratch.packed.end());
  for (int64_t p = 0; p < n; ++p) rank[scratch.packed[p] & 0xffffffffu] = static_cast<int32_t>(p);
}

DIRFAST_NOINLINE void descending_ranks(const double* v, int64_t n, SortScratch& scratch, int32_t* rank) {
  scratch.pairs.resize(n);
  for (int64_t p = 0; p < n; ++p) scratch.pairs[p] = {descending_bits(v[p]), static_cast<int32_t>(p)};
  std::sort(scratch.pairs.begin(), scratch.pairs.end());
  for (int64_t p = 0; p < n; ++p) rank[scratch.pairs[p].second] = static_cast<int32_t>(p);
}

// out[j] = sum_p w[p] rows[p][j] for j < d (rows [n, d] row-major, p ascending): 32 outputs at a
// time held in registers over p, so the result of each j is one fixed sequence of multiply-adds.
template <typename T, int W>
inline void combine_impl(const T* w, const T* rows, int64_t n, int64_t d, T* out) {
  typedef T V __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));
  int64_t j = 0;
  for (; j + 4 * W <= d; j += 4 * W) {
    V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
    for (int64_t p = 0; p < n; ++p) {
      const T* r = rows + p * d + j;
      const T wp = w[p];
      s0 += wp * load_v<V>(r);
      s1 += wp * load_v<V>(r + W);
      s2 += wp * load_v<V>(r + 2 * W);
      s3 += wp * load_v<V>(r + 3 * W);
    }
    std::memcpy(out + j, &s0, sizeof(V));
    std::memcpy(out + j + W, &s1, sizeof(V));
    std::memcpy(out + j + 2 * W, &s2, sizeof(V));
    std::memcpy(out + j + 3 * W, &s3, sizeof(V));
  }
  for (; j < d; ++j) {
    T s = 0;
    for (int64_t p = 0; p < n; ++p) s += w[p] * rows[p * d + j];
    out[j] = s;
  }
}

RANKSIM_CLONES void combine(const float* w, const float* rows, int64_t n, int64_t d, float* out) {
  combine_impl<float, 8>(w, rows, n, d, out);
}

RANKSIM_CLONES void combine(const double* w, const double* rows, int64_t n, int64_t d, double* out) {
  combine_impl<double, 4>(w, rows, n, d, out);
}

// ---------------------------------------------------------------------------- shared setup
template <typename acc_t>
struct Problem {
  int64_t m = 0, d = 0, labels_dim = 0, size = 0;  // size = M, the kept rows
  std::vector<acc_t> q, norm, keys, y;             // q [m, D]; keys [M, D] the kept rows of q; y [m, L]
  std::vector<int64_t> kept;                       // the kept rows, ascending
  std::vector<int64_t> position;                   // row -> its position among the kept rows, or -1

  Problem(const Tensor& features, const Tensor& labels, const Tensor& keep, ScalarType acc) {
    const Tensor z = contiguous_as(features, acc);
    const Tensor yt = contiguous_as(labels, acc);
    const Tensor kt = torch::stable::contiguous(keep);
    m = features.size(0);
    d = features.size(1);
    labels_dim = labels.size(1);
    const acc_t* pz = z.const_data_ptr<acc_t>();
    const acc_t* py = yt.const_data_ptr<acc_t>();
    const bool* pk = static_cast<const bool*>(kt.const_data_ptr());
    y.assign(py, py + m * labels_dim);
    q.resize(m * d);
    norm.resize(m);
    position.assign(m, -1);
    for (int64_t r = 0; r < m; ++r) {
      acc_t sum = 0;
      for (int64_t j = 0; j < d; ++j) sum += pz[r * d + j] * pz[r * d + j];
      norm[r] = std::sqrt(sum);
      const acc_t scale = std::max(norm[r], static_cast<acc_t>(kNormEps));
      for (int64_t j = 0; j < d; ++j) q[r * d + j] = pz[r * d + j] / scale;
      if (pk[r]) {
        position[r] = static_cast<int64_t>(kept.size());
        kept.push_back(r);
      }
    }
    size = static_cast<int64_t>(kept.size());
    keys.resize(size * d);
    for (int64_t p = 0; p < size; ++p) std::copy(&q[kept[p] * d], &q[kept[p] * d] + d, &keys[p * d]);
  }

  // Anchors per task: a task of at least ~2^16 multiply-adds, so small inputs run on one thread.
  int64_t grain() const { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, size * (d + 16))); }
};

// Per-thread buffers of one anchor row.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> cos, neg_dist, work;
  std::vector<int32_t> rank_cos, rank_dist, rank_work;
  SortScratch scratch;
  explicit RowBuffers(int64_t n) : cos(n), neg_dist(n), work(n), rank_cos(n), rank_dist(n), rank_work(n) {}
};

// The cosine row of anchor row i, its negated label distances and both rank rows; true when a
// value of either row is NaN.
template <typename acc_t>
DIRFAST_NOINLINE bool row_terms(const Problem<acc_t>& pb, int64_t i, RowBuffers<acc_t>& buf) {
  const int64_t n = pb.size, L = pb.labels_dim;
  dots(&pb.q[i * pb.d], pb.keys.data(), pb.d, n, buf.cos.data());
  const acc_t* yi = &pb.y[i * L];
  bool bad = false;
  for (int64_t p = 0; p < n; ++p) {
    const acc_t* yj = &pb.y[pb.kept[p] * L];
    acc_t dist = 0;
    for (int64_t k = 0; k < L; ++k) dist += std::abs(yi[k] - yj[k]);
    buf.neg_dist[p] = -dist;
    bad = bad || std::isnan(dist) || std::isnan(buf.cos[p]);
  }
  descending_ranks(buf.cos.data(), n, buf.scratch, buf.rank_cos.data());
  descending_ranks(buf.neg_dist.data(), n, buf.scratch, buf.rank_dist.data());
  return bad;
}

// ---------------------------------------------------------------------------- forward
template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, int64_t offset, int64_t count, acc_t* out) {
  const int64_t n = pb.size;
  const acc_t size = static_cast<acc_t>(n);
  torch::stable::parallel_for(0, count, pb.grain(), [&](int64_t first, int64_t last) {
    RowBuffers<acc_t> buf(n);
    for (int64_t a = first; a < last; ++a) {
      const int64_t i = offset + a;
      if (pb.position[i] < 0) {
        out[a] = 0;
        continue;
      }
      const bool bad = row_terms(pb, i, buf);
      acc_t total = 0;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t diff = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_dist[p] + 1) / size;
        total += diff * diff;
      }
      out[a] = bad ? std::numeric_limits<acc_t>::quiet_NaN() : total / size;
    }
  });
}

// ---------------------------------------------------------------------------- backward
// The surrogate row dC of every kept anchor ([count, M], zero rows for the others) and the
// anchors' part of grad_q ([count, D]).
template <typename acc_t>
DIRFAST_NOINLINE void surrogate_rows(const Problem<acc_t>& pb, int64_t offset, int64_t count, const acc_t* grad,
                                     double lambda_val, acc_t* d_cos, acc_t* grad_anchor) {
  const int64_t n = pb.size, d = pb.d;
  const acc_t size = static_cast<acc_t>(n);
  const acc_t lambda = static_cast<acc_t>(lambda_val), denom = static_cast<acc_t>(lambda_val + kLambdaEps);
  torch::stable::parallel_for(0, count, pb.grain(), [&](int64_t first, int64_t last) {
    RowBuffers<acc_t> buf(n);
    for (int64_t a = first; a < last; ++a) {
      acc_t* row = d_cos + a * n;
      acc_t* ga = grad_anchor + a * d;
      std::fill(row, row + n, acc_t(0));
      std::fill(ga, ga + d, acc_t(0));
      const int64_t i = offset + a;
      if (pb.position[i] < 0) continue;
      const bool bad = row_terms(pb, i, buf);
      const acc_t g2 = grad[a] * acc_t(2);
      for (int64_t p = 0; p < n; ++p) {  // C' = C + lambda G, as the reference rounds it
        const acc_t diff = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_dist[p] + 1) / size;
        buf.work[p] = buf.cos[p] + lambda * (g2 * diff / size);
      }
      descending_ranks(buf.work.data(), n, buf.scratch, buf.rank_work.data());
      for (int64_t p = 0; p < n; ++p) {
        const acc_t moved = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_work[p] + 1) / size;
        row[p] = bad ? std::numeric_limits<acc_t>::quiet_NaN() : -moved / denom;
      }
      combine(row, pb.keys.data(), n, d, ga);  // grad_q of the anchor: sum_j dC_aj q_j
    }
  });
}

// The keys' part of grad_q: sum over the anchors, in order, of dC_aj q_a ([M, D]).
template <typename acc_t>
DIRFAST_NOINLINE void key_gradients(const Problem<acc_t>& pb, int64_t offset, int64_t count, const acc_t* d_cos,
                                    acc_t* grad_key) {
  const int64_t n = pb.size, d = pb.d;
  torch::stable::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, count * d)),
                              [&](int64_t first, int64_t last) {
    std::vector<acc_t> column(count);
    for (int64_t p = first; p < last; ++p) {
      for (int64_t a = 0; a < count; ++a) column[a] = d_cos[a * n + p];
      combine(column.data(), &pb.q[offset * d], count, d, grad_key + p * d);
    }
  });
}

// grad_z of every row from grad_q = (anchor part) + (key part): the backward of F.normalize.
template <typename acc_t>
DIRFAST_NOINLINE void normalize_backward(const Problem<acc_t>& pb, int64_t offset, int64_t count,
                                         const acc_t* grad_anchor, const acc_t* grad_key, acc_t* grad_z) {
  const int64_t d = pb.d;
  torch::stable::parallel_for(0, pb.m, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, d)),
                              [&](int64_t first, int64_t last) {
    std::vector<acc_t> gq(d);
    for (int64_t r = first; r < last; ++r) {
      std::fill(gq.begin(), gq.end(), acc_t(0));
      if (r >= offset && r < offset + count) {
        for (int64_t j = 0; j < d; ++j) gq[j] = grad_anchor[(r - offset) * d + j];
      }
      if (pb.position[r] >= 0) {
        for (int64_t j = 0; j < d; ++j) gq[j] += grad_key[pb.position[r] * d + j];
      }
      const acc_t* qr = &pb.q[r * d];
      acc_t inner = 0;
      for (int64_t j = 0; j < d; ++j) inner += qr[j] * gq[j];
      acc_t* out = grad_z + r * d;
      if (pb.norm[r] >= static_cast<acc_t>(kNormEps)) {
        for (int64_t j = 0; j < d; ++j) out[j] = (gq[j] - qr[j] * inner) / pb.norm[r];
      } else {
        for (int64_t j = 0; j < d; ++j) out[j] = gq[j] / static_cast<acc_t>(kNormEps);
      }
    }
  });
}

Tensor ranksim_loss_cpu(const Tensor& features, const Tensor& labels, const Tensor& keep, double lambda_val,
                        int64_t offset, int64_t count) {
  const char* op = "dirfast::ranksim_loss";
  check_ranksim_args(features, labels, keep, lambda_val, offset, count, op);
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type()});
  Tensor out = empty({count}, acc, features);
  if (count == 0) return out;
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb(features, labels, keep, acc);
    forward_rows(pb, offset, count, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

Tensor ranksim_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& labels, const Tensor& keep,
                                 double lambda_val, int64_t offset, int64_t count) {
  const char* op = "dirfast::ranksim_loss_backward";
  check_ranksim_args(features, labels, keep, lambda_val, offset, count, op);
  check_same_device(grad, "grad", features, "features", op);
  check_float(grad, "grad", op);
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == count, op, ": grad must have shape [", count,
                  "] (one value per anchor), got ", shape_of(grad));
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type()});
  const int64_t m = features.size(0), d = features.size(1);
  Tensor grad_z = empty({m, d}, acc, features);
  if (m == 0 || d == 0) return torch::stable::to(grad_z, features.scalar_type());
  const Tensor gc = contiguous_as(grad, acc);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb(features, labels, keep, acc);
    std::vector<acc_t> d_cos(count * pb.size), grad_anchor(count * d), grad_key(pb.size * d);
    surrogate_rows(pb, offset, count, gc.const_data_ptr<acc_t>(), lambda_val, d_cos.data(), grad_anchor.data());
    key_gradients(pb, offset, count, d_cos.data(), grad_key.data());
    normalize_backward(pb, offset, count, grad_anchor.data(), grad_key.data(), grad_z.mutable_data_ptr<acc_t>());
  });
  return torch::stable::to(grad_z, features.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("ranksim_loss", TORCH_BOX(&dirfast::cpu::ranksim_loss_cpu));
  m.impl("ranksim_loss_backward", TORCH_BOX(&dirfast::cpu::ranksim_loss_backward_cpu));
}
