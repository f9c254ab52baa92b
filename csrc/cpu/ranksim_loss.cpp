// dirfast::ranksim_loss on CPU: RankSim's per-anchor rank-similarity loss and its blackbox
// backward (dirfast/ops/ranksim_loss.py states the definition), without an [m, m, D] tensor.
//
// The features are normalised once and the kept rows gathered into [M, D] keys. Similarities
// come from 6 x 16 register tiles of FMA products, one fixed multiply-add chain per value, so
// identical keys tie exactly; when every key is an anchor (the published use) the matrix is
// symmetric and only its upper blocks are computed. Per anchor row (one thread each): the
// label-distance ranks -- for 1-D finite labels a merge outward from the anchor in one global
// sort of the labels, O(M), else a sort -- and the similarity ranks, by a bucket pass and an
// insertion sort (comparison sorts of ~256 floats mispredict most branches); the order is
// (value descending, NaN first, key index descending: the published ranking's, with a stable
// sort, ranks the later of tied keys first). The backward recomputes these, ranks the
// shifted row C + lambda G, and forms grad_q with (dC + dC^T) keys (or dC keys and
// dC^T q_anchors when not every key is an anchor), fused with the F.normalize backward. No
// value depends on how the rows are split, so any number of threads gives the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <utility>
#include <numeric>
#include <vector>

#include "checks.h"
#include "parallel.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr double kNormEps = 1e-12;   // F.normalize's eps
constexpr double kLambdaEps = 1e-8;  // the published backward divides by lambda + 1e-8

// The products cloned for FMA where the build's baseline lacks it (src/macros.h).
#if defined(__FMA__)
#define RANKSIM_CLONES
#else
#define RANKSIM_CLONES DIRFAST_TARGET_CLONES("fma", "default")
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

// ---------------------------------------------------------------------------- products
// out[r][c] = sum_k a[r][k] b[k][c] for kTileRows rows a[r] (kdim values each) and the columns
// c < ncols of a b packed by panels of P = 2 W columns (panel j at b + j * P * kdim, its row k
// P values): one multiply-add per k, in k order, for every (r, c) in 6 x P register tiles -- the
// same arithmetic for every row and column, so identical keys get identical similarities, and
// no value depends on how the rows are split across threads.
typedef float vf8 __attribute__((vector_size(8 * sizeof(float)), aligned(4)));
typedef double vd4 __attribute__((vector_size(4 * sizeof(double)), aligned(8)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vf8;
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  using type = vd4;
  static constexpr int width = 4;
};

constexpr int64_t kTileRows = 6;
constexpr int64_t kPad = 16;  // packed columns padded to a multiple of both panel widths (16, 8)

template <typename V, typename T>
inline V load_v(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
__attribute__((always_inline)) inline void tile_impl(const T* const* a, const T* b, int64_t kdim, int64_t ncols, T* const* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const T *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t c = 0; c < ncols; c += 2 * W) {
    const T* bp = b + c * kdim;
    V s00 = V{}, s01 = V{}, s10 = V{}, s11 = V{}, s20 = V{}, s21 = V{};
    V s30 = V{}, s31 = V{}, s40 = V{}, s41 = V{}, s50 = V{}, s51 = V{};
    for (int64_t k = 0; k < kdim; ++k) {
      const V b0 = load_v<V>(bp + k * 2 * W), b1 = load_v<V>(bp + k * 2 * W + W);
      T x = a0[k];
      s00 += x * b0;
      s01 += x * b1;
      x = a1[k];
      s10 += x * b0;
      s11 += x * b1;
      x = a2[k];
      s20 += x * b0;
      s21 += x * b1;
      x = a3[k];
      s30 += x * b0;
      s31 += x * b1;
      x = a4[k];
      s40 += x * b0;
      s41 += x * b1;
      x = a5[k];
      s50 += x * b0;
      s51 += x * b1;
    }
    const V s[kTileRows][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}, {s40, s41}, {s50, s51}};
    for (int r = 0; r < kTileRows; ++r) {
      std::memcpy(out[r] + c, &s[r][0], sizeof(V));
      std::memcpy(out[r] + c + W, &s[r][1], sizeof(V));
    }
  }
}

RANKSIM_CLONES void tile(const float* const* a, const float* b, int64_t kdim, int64_t ncols, float* const* out) {
  tile_impl<float>(a, b, kdim, ncols, out);
}

RANKSIM_CLONES void tile(const double* const* a, const double* b, int64_t kdim, int64_t ncols, double* const* out) {
  tile_impl<double>(a, b, kdim, ncols, out);
}

// sum_j x[j]^2 for j < n: W lanes of partial sums, added lane by lane, then the tail.
template <typename T>
__attribute__((always_inline)) inline T sum_of_squares_impl(const T* x, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  V s = V{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V v = load_v<V>(x + j);
    s += v * v;
  }
  T total = 0;
  for (int lane = 0; lane < W; ++lane) total += s[lane];
  for (; j < n; ++j) total += x[j] * x[j];
  return total;
}

RANKSIM_CLONES float sum_of_squares(const float* x, int64_t n) { return sum_of_squares_impl(x, n); }
RANKSIM_CLONES double sum_of_squares(const double* x, int64_t n) { return sum_of_squares_impl(x, n); }

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// An allocator whose value-less construct() leaves the element uninitialised: Buffer<T>(n) is
// a vector of n values to be written, not zeroed first (the large buffers below are written
// whole; zeroing them would be a serial memset of ~2 MB per call, while the other threads wait).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <typename U>
  NoInit(const NoInit<U>&) {}
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Buffer = std::vector<T, NoInit<T>>;

// b[k][c] = src[c][k] (src [n, len] row-major; c < n, zero up to npad) packed by panels.
template <typename T>
Buffer<T> pack_transposed(const T* src, int64_t n, int64_t len, int64_t npad) {
  constexpr int64_t P = 2 * Vec<T>::width;
  Buffer<T> b(npad * len);
  std::fill(b.begin() + std::min(npad, round_up(n, P)) * len, b.end(), T(0));  // whole panels of padding
  // P source rows at a time: P reads in order, writes in order; the panels in parallel (copies).
  parallel_for_ranges((n + P - 1) / P,
                      std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, P * len)), [&](int64_t first, int64_t last) {
    for (int64_t c0 = first * P; c0 < std::min(n, last * P); c0 += P) {
      T* panel = &b[c0 * len];
      const int64_t w = std::min(P, n - c0);
      for (int64_t k = 0; k < len; ++k) {
        for (int64_t c = 0; c < w; ++c) panel[k * P + c] = src[(c0 + c) * len + k];
        for (int64_t c = w; c < P; ++c) panel[k * P + c] = T(0);  // the padding of a last panel
      }
    }
  });
  return b;
}

// b[k][c] = rows[k][c] (rows[k] len values; c < len, zero up to lenpad) packed by panels.
template <typename T>
Buffer<T> pack_rows(const T* const* rows, int64_t n, int64_t len, int64_t lenpad) {
  constexpr int64_t P = 2 * Vec<T>::width;
  Buffer<T> b(lenpad * n);
  std::fill(b.begin() + std::min(lenpad, round_up(len, P)) * n, b.end(), T(0));  // whole panels of padding
  // The panels in parallel (copies only).
  parallel_for_ranges((len + P - 1) / P,
                      std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, P * n)), [&](int64_t first, int64_t last) {
    for (int64_t c0 = first * P; c0 < std::min(len, last * P); c0 += P) {
      T* panel = &b[c0 * n];
      const int64_t w = std::min(P, len - c0);
      for (int64_t k = 0; k < n; ++k) {
        std::copy(rows[k] + c0, rows[k] + c0 + w, panel + k * P);
        std::fill(panel + k * P + w, panel + (k + 1) * P, T(0));  // the padding of a last panel
      }
    }
  });
  return b;
}

// out[r] = sum_k a[r][k] b[k] for r < nrows (a[r] = a + r * lda, out [nrows, ncols]), b packed.
template <typename T>
void product(const T* a, int64_t lda, int64_t nrows, const Buffer<T>& b, int64_t kdim, int64_t ncols, T* out) {
  if (nrows == 0) return;
  const int64_t tiles = (nrows + kTileRows - 1) / kTileRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kTileRows * kdim * ncols));
  parallel_for_pieces(tiles, grain, [&](auto next) {
    std::vector<T> spill(ncols);
    for (int64_t first, last; next(first, last);) {
      for (int64_t t = first; t < last; ++t) {
        const T* rows[kTileRows];
        T* outs[kTileRows];
        for (int64_t r = 0; r < kTileRows; ++r) {
          const int64_t row = t * kTileRows + r;
          rows[r] = a + std::min(row, nrows - 1) * lda;  // a short last tile repeats its last row
          outs[r] = row < nrows ? out + row * ncols : spill.data();
        }
        tile(rows, b.data(), kdim, ncols, outs);
      }
    }
  });
}

// ---------------------------------------------------------------------------- ranks
// rank[p] = the 0-based position of v[p] in the order (value descending, NaN first, then index
// ascending): each value becomes an unsigned key that sorts ascending in that order (-0 as +0,
// every NaN as one NaN above +inf), so the sort compares integers: a strict total order, also
// with NaN.
inline uint32_t descending_bits(float v) {
  v = v + 0.0f;  // -0 -> +0
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  b = v != v ? 0x7fc00000u : b;  // one NaN
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u;
  return ~(b ^ flip);  // without branches: the signs of the values are unpredictable
}

inline uint64_t descending_bits(double v) {
  if (std::isnan(v)) v = std::numeric_limits<double>::quiet_NaN();
  v = v + 0.0;
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return ~((b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull));
}

struct SortScratch {
  std::vector<uint64_t> packed;                      // float32: key << 32 | (n - 1 - index)
  std::vector<std::pair<uint64_t, int32_t>> pairs;   // float64
  std::vector<uint32_t> bucket, count;               // float32 bucket pass
};

// float32: the packed keys (key << 32 | (n - 1 - index), all distinct; ties by index
// descending) put in order. From kBucketMin finite values with a spread, a bucket pass first: 2 n buckets over mean +- 3 standard
// deviations (the rest in the end buckets), filled in index order, then an insertion sort,
// which only moves keys within a bucket -- O(n) for the similarity rows, which are bell-shaped
// (an O(n log n) sort of 256 keys mispredicts most of its branches). An insertion sort that
// moves more than 8 n keys (a skewed row) hands over to std::sort; so do short rows, rows with a NaN or an
// infinity, and flat rows.
constexpr int64_t kBucketMin = 64;

DIRFAST_NOINLINE void descending_ranks(const float* v, int64_t n, SortScratch& s, int32_t* rank) {
  s.packed.resize(n);
  uint64_t* o = s.packed.data();
  vf8 sum8 = vf8{}, squares8 = vf8{};  // the moments only place the buckets
  int64_t p0 = 0;
  for (; p0 + 8 <= n; p0 += 8) {
    const vf8 x = load_v<vf8>(v + p0);
    sum8 += x;
    squares8 += x * x;
  }
  float sum = 0, squares = 0;
  for (int lane = 0; lane < 8; ++lane) {
    sum += sum8[lane];
    squares += squares8[lane];
  }
  for (; p0 < n; ++p0) {
    sum += v[p0];
    squares += v[p0] * v[p0];
  }
  const bool nan = !std::isfinite(sum) || !std::isfinite(squares);  // a NaN or an infinity
  const float mean = sum / static_cast<float>(n);
  const float sd = std::sqrt(std::max(squares / static_cast<float>(n) - mean * mean, 0.0f));
  int64_t buckets = 1;
  while (buckets < 2 * n) buckets <<= 1;
  const float low = mean - 3 * sd, scale = static_cast<float>(buckets) / (6 * sd);
  if (n < kBucketMin || nan || !(scale > 0) || !std::isfinite(scale) || !std::isfinite(low)) {
    for (int64_t p = 0; p < n; ++p) o[p] = (uint64_t(descending_bits(v[p])) << 32) | uint64_t(n - 1 - p);
    std::sort(o, o + n);
  } else {
    s.bucket.resize(n);
    s.count.assign(buckets + 1, 0);
    uint32_t* b = s.bucket.data();
    uint32_t* c = s.count.data();
    const float top = static_cast<float>(buckets - 1);
    for (int64_t p = 0; p < n; ++p) {  // descending: the largest values in bucket 0
      b[p] = static_cast<uint32_t>(buckets - 1) - static_cast<uint32_t>(std::min(std::max((v[p] - low) * scale, 0.0f), top));
    }
    for (int64_t p = 0; p < n; ++p) ++c[b[p] + 1];
    for (int64_t k = 1; k <= buckets; ++k) c[k] += c[k - 1];
    for (int64_t p = 0; p < n; ++p) o[c[b[p]]++] = (uint64_t(descending_bits(v[p])) << 32) | uint64_t(n - 1 - p);
    int64_t moves = 0;
    for (int64_t t = 1; t < n; ++t) {
      const uint64_t x = o[t];
      int64_t u = t;
      for (; u > 0 && o[u - 1] > x; --u) o[u] = o[u - 1];
      o[u] = x;
      moves += t - u;
      if (moves > 8 * n) {
        std::sort(o, o + n);
        break;
      }
    }
  }
  for (int64_t p = 0; p < n; ++p) rank[n - 1 - int64_t(o[p] & 0xffffffffu)] = static_cast<int32_t>(p);
}

DIRFAST_NOINLINE void descending_ranks(const double* v, int64_t n, SortScratch& s, int32_t* rank) {
  s.pairs.resize(n);
  for (int64_t p = 0; p < n; ++p) s.pairs[p] = {descending_bits(v[p]), static_cast<int32_t>(n - 1 - p)};
  std::sort(s.pairs.begin(), s.pairs.end());
  for (int64_t p = 0; p < n; ++p) rank[n - 1 - s.pairs[p].second] = static_cast<int32_t>(p);
}

// ---------------------------------------------------------------------------- shared setup
template <typename acc_t>
struct Problem {
  int64_t m = 0, d = 0, labels_dim = 0, size = 0;  // size = M, the kept rows
  int64_t size_pad = 0, d_pad = 0;                 // M and D rounded up to kPad
  Buffer<acc_t> q, keys;                           // q [m, D]; keys [M, D] the kept rows of q
  std::vector<acc_t> norm, y;                      // y [m, L]
  std::vector<int64_t> kept;                       // the kept rows, ascending
  std::vector<int64_t> position;                   // row -> its position among the kept rows, or -1
  std::vector<int64_t> anchors;                    // the kept rows among offset .. offset + count - 1
  Buffer<acc_t> keys_t;                            // keys^T [D, M] packed for `product`/`tile`
  // 1-D labels, every kept one finite: the kept keys sorted by (label, position) once, and the
  // slot of each key in that order (see label_ranks).
  bool sorted_labels = false;
  std::vector<acc_t> sorted_value;
  std::vector<int32_t> sorted_key, slot;

  Problem(const Tensor& features, const Tensor& labels, const Tensor& keep, ScalarType acc, int64_t offset,
          int64_t count) {
    const Tensor z = contiguous_as(features, acc);
    const Tensor yt = contiguous_as(labels, acc);
    const Tensor kt = made_contiguous(keep);
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
      if (pk[r]) {
        position[r] = static_cast<int64_t>(kept.size());
        kept.push_back(r);
        if (r >= offset && r < offset + count) anchors.push_back(r);
      }
    }
    size = static_cast<int64_t>(kept.size());
    size_pad = round_up(size, kPad);
    d_pad = round_up(d, kPad);
    keys.resize(size * d);
    // The normalising and the gather of the keys, row by row in one parallel region (each row's
    // values are computed the same way on any thread): serial, they would be a good part of a call
    // at M = 256, D = 512 on 2 threads.
    parallel_for_ranges(m, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, d)), [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        norm[r] = std::sqrt(sum_of_squares(pz + r * d, d));
        const acc_t scale = std::max(norm[r], static_cast<acc_t>(kNormEps));
        for (int64_t j = 0; j < d; ++j) q[r * d + j] = pz[r * d + j] / scale;
        if (position[r] >= 0) std::copy(&q[r * d], &q[r * d] + d, &keys[position[r] * d]);
      }
    });
    keys_t = pack_transposed(keys.data(), size, d, size_pad);

    sorted_labels = labels_dim == 1;
    for (int64_t p = 0; p < size && sorted_labels; ++p) sorted_labels = std::isfinite(y[kept[p]]);
    if (sorted_labels) {
      sorted_key.resize(size);
      std::iota(sorted_key.begin(), sorted_key.end(), 0);
      std::sort(sorted_key.begin(), sorted_key.end(), [&](int32_t a, int32_t b) {
        const acc_t ya = y[kept[a]], yb = y[kept[b]];
        return ya < yb || (ya == yb && a < b);
      });
      sorted_value.resize(size);
      slot.resize(size);
      for (int64_t s = 0; s < size; ++s) {
        sorted_value[s] = y[kept[sorted_key[s]]];
        slot[sorted_key[s]] = static_cast<int32_t>(s);
      }
    }
  }

  // Anchor tiles per task: a task of at least ~2^16 multiply-adds, so small inputs run on one thread.
  int64_t grain() const {
    return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kTileRows * size * (d + 16)));
  }
};

// Per-thread buffers: the similarities of one tile of anchors and the rows of one anchor.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> cos, neg_dist, work, order_dist;
  std::vector<int32_t> rank_cos, rank_dist, rank_work, order_key;
  SortScratch scratch;
  explicit RowBuffers(const Problem<acc_t>& pb)
      : cos(kTileRows * pb.size_pad), neg_dist(pb.size), work(pb.size), order_dist(pb.size), rank_cos(pb.size),
        rank_dist(pb.size), rank_work(pb.size), order_key(pb.size) {}
};

// The similarity rows of the anchors first .. first + kTileRows - 1 (anchor indices into
// pb.anchors; a short last tile repeats its last anchor) into buf.cos, kTileRows rows of M_pad.
template <typename acc_t>
void similarity_tile(const Problem<acc_t>& pb, int64_t first, RowBuffers<acc_t>& buf) {
  const int64_t na = static_cast<int64_t>(pb.anchors.size());
  const acc_t* rows[kTileRows];
  acc_t* outs[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) {
    rows[r] = &pb.keys[pb.position[pb.anchors[std::min(first + r, na - 1)]] * pb.d];
    outs[r] = &buf.cos[r * pb.size_pad];
  }
  tile(rows, pb.keys_t.data(), pb.d, pb.size_pad, outs);
}

// rank_dist of a 1-D finite label row from the global order: the keys come in increasing
// distance by a merge outward from the anchor's slot (left and right, each side monotone in
// |y_i - y_j| as rounding is monotone), O(M) instead of a sort; runs of equal distance are
// then put in descending key order, the tie rule.
template <typename acc_t>
void label_ranks(const Problem<acc_t>& pb, int64_t key, RowBuffers<acc_t>& buf) {
  const int64_t n = pb.size;
  const acc_t* v = pb.sorted_value.data();
  const int32_t* ks = pb.sorted_key.data();
  acc_t* od = buf.order_dist.data();
  int32_t* ok = buf.order_key.data();
  const int64_t s0 = pb.slot[key];
  const acc_t yi = v[s0];
  od[0] = 0;
  ok[0] = static_cast<int32_t>(key);
  int64_t l = s0 - 1, r = s0 + 1, t = 1;
  while (l >= 0 && r < n) {  // without branches: the side taken is unpredictable
    const acc_t dl = std::abs(yi - v[l]), dr = std::abs(yi - v[r]);
    const int64_t left = dl <= dr;
    const int64_t from = r + left * (l - r);
    od[t] = left ? dl : dr;
    ok[t] = ks[from];
    l -= left;
    r += 1 - left;
    ++t;
  }
  for (; l >= 0; --l, ++t) {
    od[t] = std::abs(yi - v[l]);
    ok[t] = ks[l];
  }
  for (; r < n; ++r, ++t) {
    od[t] = std::abs(yi - v[r]);
    ok[t] = ks[r];
  }
  for (int64_t a = 1; a < n; ++a) {
    if (od[a] != od[a - 1]) continue;
    int64_t b = a + 1;
    while (b < n && od[b] == od[a]) ++b;
    std::sort(ok + a - 1, ok + b, std::greater<int32_t>());
    a = b;
  }
  for (int64_t p = 0; p < n; ++p) buf.rank_dist[ok[p]] = static_cast<int32_t>(p);
}

// The label-distance ranks and similarity ranks of anchor row i, whose similarity row is cos;
// true when a value of either row is NaN.
template <typename acc_t>
DIRFAST_NOINLINE bool row_terms(const Problem<acc_t>& pb, int64_t i, const acc_t* cos, RowBuffers<acc_t>& buf) {
  const int64_t n = pb.size, L = pb.labels_dim;
  bool bad = false;
  for (int64_t p = 0; p < n; ++p) bad |= cos[p] != cos[p];
  if (pb.sorted_labels) {
    label_ranks(pb, pb.position[i], buf);
  } else {
    const acc_t* yi = &pb.y[i * L];
    for (int64_t p = 0; p < n; ++p) {
      const acc_t* yj = &pb.y[pb.kept[p] * L];
      acc_t dist = 0;
      for (int64_t k = 0; k < L; ++k) dist += std::abs(yi[k] - yj[k]);
      buf.neg_dist[p] = -dist;
      bad = bad || std::isnan(dist);
    }
    descending_ranks(buf.neg_dist.data(), n, buf.scratch, buf.rank_dist.data());
  }
  descending_ranks(cos, n, buf.scratch, buf.rank_cos.data());
  return bad;
}

// The similarity matrix [M, M_pad] when every key is an anchor (anchor t is key t, the
// published use): C is symmetric, and q_i . q_j and q_j . q_i are the same chain of multiply-adds
// (the products commute), so only the 48 x 48 blocks on and above the diagonal are computed and
// the rest copied (by the task of each row, before it reads the row) -- half the multiply-adds,
// the same bits.
constexpr int64_t kBlock = 48;  // a multiple of kTileRows and of kPad

template <typename acc_t>
DIRFAST_NOINLINE Buffer<acc_t> similarity_matrix(const Problem<acc_t>& pb) {
  const int64_t n = pb.size, np = pb.size_pad, d = pb.d;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // Tasks of one tile of kTileRows rows by one column block on or above the diagonal, all about
  // the same cost: a piece is a contiguous range of tasks, and tasks of a whole row block (fewer to
  // the right) would leave the first thread with most of the work on 2 threads
  // (benchmarks/results/cpu/design-constants.md).
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (first row of the tile, column block), column >= row
  for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
    for (int64_t cb = t0 / kBlock; cb < blocks; ++cb) tasks.emplace_back(t0, cb);
  }
  Buffer<acc_t> c(n * np);  // every value written below
  const int64_t tile_madds = kTileRows * kBlock * std::max<int64_t>(d, 1);
  parallel_for_pieces(static_cast<int64_t>(tasks.size()),
                      std::max<int64_t>(1, (int64_t(1) << 16) / tile_madds), [&](auto next) {
    std::vector<acc_t> spill(kBlock);
    for (int64_t first, last; next(first, last);) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t c0 = tasks[task].second * kBlock;
        const int64_t width = std::min(kBlock, np - c0);  // a multiple of kPad
        {
          const int64_t t0 = tasks[task].first;
          const acc_t* rows[kTileRows];
          acc_t* outs[kTileRows];
          for (int64_t r = 0; r < kTileRows; ++r) {
            const int64_t row = t0 + r;
            rows[r] = &pb.keys[std::min(row, n - 1) * d];
            outs[r] = row < n ? &c[row * np + c0] : spill.data();
          }
          tile(rows, pb.keys_t.data() + c0 * d, d, width, outs);
        }
      }
    }
  });
  return c;
}

// body(anchor index t into pb.anchors, its similarity row, buffers) for every kept anchor:
// from the symmetric matrix when every key is an anchor, else a tile of kTileRows anchors a step.
template <typename acc_t, typename Body>
void for_each_anchor(const Problem<acc_t>& pb, Body&& body) {
  const int64_t na = static_cast<int64_t>(pb.anchors.size());
  if (na == pb.size) {
    Buffer<acc_t> c = similarity_matrix(pb);
    const int64_t np = pb.size_pad;
    parallel_for_pieces(na, std::max<int64_t>(1, 1024 / std::max<int64_t>(1, na)), [&](auto next) {
      RowBuffers<acc_t> buf(pb);
      for (int64_t first, last; next(first, last);) {
        for (int64_t t = first; t < last; ++t) {
          for (int64_t j = 0; j < t / kBlock * kBlock; ++j) c[t * np + j] = c[j * np + t];  // (j, t) is above the diagonal
          body(t, &c[t * np], buf);
        }
      }
    });
    return;
  }
  const int64_t tiles = (na + kTileRows - 1) / kTileRows;
  parallel_for_pieces(tiles, pb.grain(), [&](auto next) {
    RowBuffers<acc_t> buf(pb);
    for (int64_t first, last; next(first, last);) {
      for (int64_t tl = first; tl < last; ++tl) {
        similarity_tile(pb, tl * kTileRows, buf);
        for (int64_t r = 0; r < kTileRows && tl * kTileRows + r < na; ++r) {
          body(tl * kTileRows + r, &buf.cos[r * pb.size_pad], buf);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- forward
template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, int64_t offset, int64_t count, acc_t* out) {
  const int64_t n = pb.size;
  const acc_t size = static_cast<acc_t>(n);
  std::fill(out, out + count, acc_t(0));
  for_each_anchor(pb, [&](int64_t t, const acc_t* cos, RowBuffers<acc_t>& buf) {
    const int64_t i = pb.anchors[t];
    const bool bad = row_terms(pb, i, cos, buf);
    acc_t total = 0;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t diff = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_dist[p] + 1) / size;
      total += diff * diff;
    }
    out[i - offset] = bad ? std::numeric_limits<acc_t>::quiet_NaN() : total / size;
  });
}

// ---------------------------------------------------------------------------- backward
// The surrogate row dC of every kept anchor ([na, M], row t the anchor pb.anchors[t]).
template <typename acc_t>
DIRFAST_NOINLINE void surrogate_rows(const Problem<acc_t>& pb, int64_t offset, const acc_t* grad, double lambda_val,
                                     acc_t* d_cos) {
  const int64_t n = pb.size;
  const acc_t size = static_cast<acc_t>(n);
  const acc_t lambda = static_cast<acc_t>(lambda_val), denom = static_cast<acc_t>(lambda_val + kLambdaEps);
  for_each_anchor(pb, [&](int64_t t, const acc_t* cos, RowBuffers<acc_t>& buf) {
    const int64_t i = pb.anchors[t];
    acc_t* row = d_cos + t * n;
    const bool bad = row_terms(pb, i, cos, buf);
    const acc_t g2 = grad[i - offset] * acc_t(2);
    for (int64_t p = 0; p < n; ++p) {  // C' = C + lambda G, as the reference rounds it
      const acc_t diff = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_dist[p] + 1) / size;
      buf.work[p] = cos[p] + lambda * (g2 * diff / size);
    }
    descending_ranks(buf.work.data(), n, buf.scratch, buf.rank_work.data());
    for (int64_t p = 0; p < n; ++p) {
      const acc_t moved = static_cast<acc_t>(buf.rank_cos[p] + 1) / size - static_cast<acc_t>(buf.rank_work[p] + 1) / size;
      row[p] = bad ? std::numeric_limits<acc_t>::quiet_NaN() : -moved / denom;
    }
  });
}

// grad_z of row r from its grad_q (gq, D values; null: zero): the backward of F.normalize.
template <typename acc_t>
inline void normalize_row(const Problem<acc_t>& pb, int64_t r, const acc_t* gq, acc_t* grad_z) {
  const int64_t d = pb.d;
  const acc_t* qr = &pb.q[r * d];
  acc_t* out = grad_z + r * d;
  acc_t inner = 0;
  if (gq) {
    for (int64_t j = 0; j < d; ++j) inner += qr[j] * gq[j];
  } else {
    for (int64_t j = 0; j < d; ++j) inner += qr[j] * acc_t(0);  // NaN for a NaN row, as the reference
  }
  for (int64_t j = 0; j < d; ++j) {
    const acc_t g = gq ? gq[j] : acc_t(0);
    out[j] = pb.norm[r] >= static_cast<acc_t>(kNormEps) ? (g - qr[j] * inner) / pb.norm[r]
                                                        : g / static_cast<acc_t>(kNormEps);
  }
}

// grad_z from the surrogate rows dC ([na, M]). grad_q of kept row p is sum_j dC_pj q_j when it is
// an anchor (its anchor part) plus sum_a dC_ap q_a (its key part). When every key is an anchor
// (the published use) both are one product, (dC + dC^T) keys, a tile of kTileRows rows of
// dC + dC^T built, multiplied and normalised in one task; else two products, dC keys for the
// anchors and dC^T q_anchors for the keys (each about na M D multiply-adds), then the normalising.
template <typename acc_t>
DIRFAST_NOINLINE void feature_gradients(const Problem<acc_t>& pb, const Buffer<acc_t>& d_cos, acc_t* grad_z) {
  const int64_t n = pb.size, d = pb.d, dp = pb.d_pad, na = static_cast<int64_t>(pb.anchors.size());
  for (int64_t r = 0; r < pb.m; ++r) {
    if (pb.position[r] < 0) normalize_row(pb, r, static_cast<const acc_t*>(nullptr), grad_z);
  }
  std::vector<const acc_t*> key_rows(n);
  for (int64_t p = 0; p < n; ++p) key_rows[p] = &pb.keys[p * d];
  const Buffer<acc_t> keys_b = pack_rows(key_rows.data(), n, d, dp);
  if (na == n) {  // anchor t is key t
    const int64_t tiles = (n + kTileRows - 1) / kTileRows;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kTileRows * n * dp));
    parallel_for_pieces(tiles, grain, [&](auto next) {
      std::vector<acc_t> w(kTileRows * n), gq(kTileRows * dp);
      for (int64_t first, last; next(first, last);) {
        for (int64_t t = first; t < last; ++t) {
          const acc_t* rows[kTileRows];
          acc_t* outs[kTileRows];
          for (int64_t r = 0; r < kTileRows; ++r) {
            const int64_t p = std::min(t * kTileRows + r, n - 1);  // a short last tile repeats its last row
            for (int64_t j = 0; j < n; ++j) w[r * n + j] = d_cos[p * n + j] + d_cos[j * n + p];
            rows[r] = &w[r * n];
            outs[r] = &gq[r * dp];
          }
          tile(rows, keys_b.data(), n, dp, outs);
          for (int64_t r = 0; r < kTileRows && t * kTileRows + r < n; ++r) {
            normalize_row(pb, pb.kept[t * kTileRows + r], outs[r], grad_z);
          }
        }
      }
    });
    return;
  }
  std::vector<acc_t> grad_q(n * dp), grad_anchor(na * dp), d_cos_t(n * na);
  product(d_cos.data(), n, na, keys_b, n, dp, grad_anchor.data());
  for (int64_t t = 0; t < na; ++t) {
    for (int64_t p = 0; p < n; ++p) d_cos_t[p * na + t] = d_cos[t * n + p];
  }
  std::vector<const acc_t*> anchor_rows(na);
  for (int64_t t = 0; t < na; ++t) anchor_rows[t] = &pb.keys[pb.position[pb.anchors[t]] * d];
  const Buffer<acc_t> anchors_b = pack_rows(anchor_rows.data(), na, d, dp);
  product(d_cos_t.data(), na, n, anchors_b, na, dp, grad_q.data());
  for (int64_t t = 0; t < na; ++t) {
    acc_t* g = &grad_q[pb.position[pb.anchors[t]] * dp];
    const acc_t* ga = &grad_anchor[t * dp];
    for (int64_t j = 0; j < d; ++j) g[j] = ga[j] + g[j];
  }
  parallel_for_ranges(n, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, d)), [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) normalize_row(pb, pb.kept[p], &grad_q[p * dp], grad_z);
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
    const Problem<acc_t> pb(features, labels, keep, acc, offset, count);
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
    const Problem<acc_t> pb(features, labels, keep, acc, offset, count);
    Buffer<acc_t> d_cos(pb.anchors.size() * pb.size);  // every value written by surrogate_rows
    surrogate_rows(pb, offset, gc.const_data_ptr<acc_t>(), lambda_val, d_cos.data());
    feature_gradients(pb, d_cos, grad_z.mutable_data_ptr<acc_t>());
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
