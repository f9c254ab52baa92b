// dirfast::rnc_loss on CPU: the Rank-N-Contrast loss of each anchor row against all m rows, and
// its gradient in the features, in O(m^2 log m + m^2 D) time and O(count m) memory.
//
// Both passes first fill the anchors' distances r_ik = ||z_i - z_k|| ([count, m]) by tiles of 32
// anchors x 32 keys, 2 x 4 pairs at a time in registers (exact difference norms, the squares
// accumulated by FMA in 32-byte vectors, so identical rows are exactly 0 apart); a pair of two
// anchors is computed once and written to both rows (it is the same bits either way).
// Then per anchor i (one task each): the L1 label distances d_k and the keys k != i in order of
// d_k (with one finite label, a merge outwards from i in the rows' label order, sorted once; else
// a sort by (d_k, k)). The logits s_k = -r_k / t are never formed (r / t overflows float32 long
// before the loss does, and log S = -low / t + log total rounds log total away once r / t is
// large): S of each tie group is kept in distance units, S = exp(-low / t) total, low the smallest
// distance from the group to the end and total = sum exp((low - r_k) / t) >= 1; the terms
// exp((L_k - r_k) / t), L_k the running minimum from the end, vectorised, then summed from the
// end (rescaled where the minimum falls); out = sum (r_k - low_k) / (m-1) / t + sum log total_k / (m-1).
// The backward walks the groups from the start with the prefix sums sum_{j: d_j <= d_k} 1 / S_j
// as A exp(low / t), A rescaled where low grows, giving dL/ds_k = c (A exp((low_k - r_k) / t) - 1)
// with c = grad / (m - 1), and the weights w_k = dL/ds_k / r_k (0 where r_k = 0) into a
// [count, m] matrix. A second pass adds to each row r, in the order of p, b_rp (z_p - z_r) with
// b_rp = w[r][p] + w[p][r] (the anchor's and the keys' shares), 3 rows x 2 vectors in registers per
// partner, and divides the row by t last (dL/ds / (r t) itself passes float32's range for pairs
// 0.1 apart at t = 1e-38, where the gradient does not).
// Every sum has an order fixed by the inputs and every clone computes the same bits (FMA is
// std::fma lane by lane where the CPU has none), so the bits do not depend on threads or CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// x86-64-v3 (AVX2 + FMA) or the baseline: the lane-wise fused multiply-adds below become one
// vfmadd there and libm's fma here, with the same bits. No other a * b + c is fused (g++ would in
// the x86-64-v3 clone), so both clones round alike (above the project's headers: theirs too).
#pragma GCC optimize("fp-contract=off")

#include "checks.h"
#include "parallel.h"
#include "vexp.h"

namespace dirfast {
namespace cpu {
namespace {

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
  // The kernel divides by it in the accumulation dtype: a normal number there (a subnormal one has
  // lost bits, its reciprocal may round to inf, and it is 0 where denormals are flushed), finite.
  const bool is_float = acc_type({features.scalar_type(), labels.scalar_type()}) == ScalarType::Float;
  const double big = is_float ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  const double tiny = is_float ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  STD_TORCH_CHECK(temperature <= big && temperature >= tiny, op, ": temperature must be in [", tiny, ", ", big,
                  "] (a normal number in the dtype the op computes in: it and 1/temperature finite there), got ",
                  temperature);
  STD_TORCH_CHECK(offset >= 0 && offset <= m, op, ": offset must be in [0, ", m, "] (the rows of features), got ",
                  offset);
  STD_TORCH_CHECK(count >= 0 && count <= m - offset, op, ": count must be in [0, ", m - offset,
                  "] (offset + count <= ", m, " rows), got ", count);
}

// ---------------------------------------------------------------------------- vectors
// 32-byte vectors (8 floats or 4 doubles: one AVX register).
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

template <typename T>
__attribute__((always_inline)) inline void store(T* p, typename Lanes<T>::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
__attribute__((always_inline)) inline typename Lanes<T>::vec splat(T c) {
  typename Lanes<T>::vec v;
#pragma GCC unroll 8
  for (int l = 0; l < Lanes<T>::n; ++l) v[l] = c;
  return v;
}

// a * b + c rounded once, lane by lane (one instruction where the clone has FMA).
template <typename T>
__attribute__((always_inline)) inline typename Lanes<T>::vec vfma(typename Lanes<T>::vec a, typename Lanes<T>::vec b,
                                                                  typename Lanes<T>::vec c) {
  typename Lanes<T>::vec r;
#pragma GCC unroll 8
  for (int l = 0; l < Lanes<T>::n; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
}

// The lanes of v added pairwise, neighbours first: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + ...).
template <typename T>
__attribute__((always_inline)) inline T lane_sum(typename Lanes<T>::vec v) {
  T t[Lanes<T>::n];
  std::memcpy(t, &v, sizeof(v));
  for (int64_t width = Lanes<T>::n; width > 1; width /= 2) {
    for (int64_t l = 0; l < width / 2; ++l) t[l] = t[2 * l] + t[2 * l + 1];
  }
  return t[0];
}

// ---------------------------------------------------------------------------- distances
// The distance of one pair: the squares by lane, the lanes by lane_sum, then the tail D % lanes.
template <typename T>
__attribute__((always_inline)) inline T pair_distance(const T* zi, const T* zk, int64_t D) {
  using V = typename Lanes<T>::vec;
  constexpr int64_t n = Lanes<T>::n;
  const int64_t full = D - D % n;
  V acc{};
  for (int64_t j = 0; j < full; j += n) {
    const V d = load(zi + j) - load(zk + j);
    acc = vfma<T>(d, d, acc);
  }
  T total = lane_sum<T>(acc);
  for (int64_t j = full; j < D; ++j) {
    const T d = zi[j] - zk[j];
    total = std::fma(d, d, total);
  }
  return std::sqrt(total);
}

// The 8 pairs of anchors zi, zi + D and keys zk .. zk + 3D, out[4 a + q]: the same bits as
// pair_distance (each lane's squares in the order of j, then lane_sum, then the tail).
template <typename T>
__attribute__((always_inline)) inline void block_distances(const T* zi, const T* zk, int64_t D, T* out) {
  using V = typename Lanes<T>::vec;
  constexpr int64_t n = Lanes<T>::n;
  const int64_t full = D - D % n;
  V acc[8] = {};
  for (int64_t j = 0; j < full; j += n) {
    const V x0 = load(zi + j), x1 = load(zi + D + j);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const V y = load(zk + q * D + j);
      const V d0 = x0 - y, d1 = x1 - y;
      acc[q] = vfma<T>(d0, d0, acc[q]);
      acc[4 + q] = vfma<T>(d1, d1, acc[4 + q]);
    }
  }
  if constexpr (n == 8) {  // lane_sum of all 8 at once, as haddps does it
    auto hadd = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
             __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    const V g0 = hadd(hadd(acc[0], acc[1]), hadd(acc[2], acc[3]));
    const V g1 = hadd(hadd(acc[4], acc[5]), hadd(acc[6], acc[7]));
    const V total = __builtin_shufflevector(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15);
    store(out, total);
  } else {
    for (int p = 0; p < 8; ++p) out[p] = lane_sum<T>(acc[p]);
  }
  for (int p = 0; p < 8; ++p) {
    const T* a = zi + (p / 4) * D;
    const T* k = zk + (p % 4) * D;
    T total = out[p];
    for (int64_t j = full; j < D; ++j) {
      const T d = a[j] - k[j];
      total = std::fma(d, d, total);
    }
    out[p] = total;
  }
  for (int p = 0; p < 8; ++p) out[p] = std::sqrt(out[p]);
}

// One tile: anchors [i0, i1) x keys [k0, k1) into R [count, m] (row i - offset), and the keys
// k < mirror_end also into row k - offset (they are anchors too).
template <typename T>
__attribute__((always_inline)) inline void tile_body(const T* Z, int64_t m, int64_t D, int64_t offset, int64_t i0,
                                                     int64_t i1, int64_t k0, int64_t k1, int64_t mirror_end, T* R) {
  T out[8];
  for (int64_t i = i0; i < i1; i += 2) {
    T* ri = R + (i - offset) * m;
    if (i + 1 < i1) {
      T* rj = ri + m;
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        block_distances(Z + i * D, Z + k * D, D, out);
        for (int q = 0; q < 4; ++q) {
          ri[k + q] = out[q];
          rj[k + q] = out[4 + q];
          if (k + q < mirror_end) {
            R[(k + q - offset) * m + i] = out[q];
            R[(k + q - offset) * m + i + 1] = out[4 + q];
          }
        }
      }
      for (; k < k1; ++k) {
        ri[k] = pair_distance(Z + i * D, Z + k * D, D);
        rj[k] = pair_distance(Z + (i + 1) * D, Z + k * D, D);
        if (k < mirror_end) {
          R[(k - offset) * m + i] = ri[k];
          R[(k - offset) * m + i + 1] = rj[k];
        }
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) {
        ri[k] = pair_distance(Z + i * D, Z + k * D, D);
        if (k < mirror_end) R[(k - offset) * m + i] = ri[k];
      }
    }
  }
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void tile(const float* Z, int64_t m, int64_t D, int64_t offset, int64_t i0,
                                             int64_t i1, int64_t k0, int64_t k1, int64_t mirror_end, float* R) {
  tile_body(Z, m, D, offset, i0, i1, k0, k1, mirror_end, R);
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void tile(const double* Z, int64_t m, int64_t D, int64_t offset, int64_t i0,
                                             int64_t i1, int64_t k0, int64_t k1, int64_t mirror_end, double* R) {
  tile_body(Z, m, D, offset, i0, i1, k0, k1, mirror_end, R);
}

struct Tile {
  int64_t i0, i1, k0, k1, mirror_end;
};

// R[a][k] = ||z_{offset + a} - z_k|| for the count anchors and the m keys. Blocks of 32 rows;
// tile (I, K) pairs the anchors of block I with the keys of block K: all of them when K >= I (and
// when K > I the keys that are anchors get the pair in their row too), only the keys below
// offset when K < I (the others came from tile (K, I)). The tiles are independent.
template <typename acc_t>
void fill_distances(const acc_t* Z, int64_t m, int64_t D, int64_t offset, int64_t count, acc_t* R) {
  constexpr int64_t B = 32;
  std::vector<Tile> tiles;
  for (int64_t I = offset / B; I * B < offset + count; ++I) {
    const int64_t i0 = std::max(I * B, offset), i1 = std::min((I + 1) * B, offset + count);
    for (int64_t K = 0; K * B < m; ++K) {
      const int64_t k0 = K * B, k1 = std::min(k0 + B, m);
      if (K < I) {
        if (k0 < offset) tiles.push_back(Tile{i0, i1, k0, std::min(k1, offset), k0});
      } else {
        tiles.push_back(Tile{i0, i1, k0, k1, K > I ? offset + count : k0});
      }
    }
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (B * B * (D + 4)));
  parallel_for_ranges(static_cast<int64_t>(tiles.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const Tile& x = tiles[t];
      tile(Z, m, D, offset, x.i0, x.i1, x.k0, x.k1, x.mirror_end, R);
    }
  });
}

// ---------------------------------------------------------------------------- exp
// out[p] = exp(x[p]); float: 8 lanes at a time by a Cody-Waite reduction and Cephes' degree-6
// polynomial (about 1 ulp; 0 below -103, inf above 88.72, NaN stays NaN), plain + and *
// only (the same bits in every clone). double: std::exp.
template <typename T>
__attribute__((always_inline)) inline void exp_body(const T* x, T* out, int64_t count);

template <>
__attribute__((always_inline)) inline void exp_body<float>(const float* x, float* out, int64_t count) {
  using V = Lanes<float>::vec;
  typedef int32_t I __attribute__((vector_size(32), aligned(4)));
  const auto splat = [](float v) { return V{v, v, v, v, v, v, v, v}; };
  const auto pow2 = [](I k) {  // 2^k for -126 <= k <= 127
    const I bits = (k + 127) << 23;
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  };
  int64_t p = 0;
  for (; p + 8 <= count; p += 8) {
    const V v = load(x + p);
    V c = v < splat(-103.0f) ? splat(-103.0f) : v;
    c = c > splat(88.72f) ? splat(88.72f) : c;
    const V big = splat(kRoundWhole);  // adding it rounds to a whole number
    const V k = (c * splat(kLog2e) + big) - big;
    const V r = (c - k * splat(kLn2Hi)) - k * splat(kLn2Lo);
    V q = splat(kExpPoly[0]);
    q = q * r + splat(kExpPoly[1]);
    q = q * r + splat(kExpPoly[2]);
    q = q * r + splat(kExpPoly[3]);
    q = q * r + splat(kExpPoly[4]);
    q = q * r + splat(kExpPoly[5]);
    const V e = q * (r * r) + r + splat(1.0f);
    const I n = __builtin_convertvector(k, I), half = n >> 1;  // -149 <= n <= 128: 2^n in two factors
    V y = (e * pow2(half)) * pow2(n - half);
    y = v < splat(-103.0f) ? splat(0.0f) : y;
    y = v > splat(88.72f) ? splat(std::numeric_limits<float>::infinity()) : y;
    y = v != v ? v : y;
    store(out + p, y);
  }
  for (; p < count; ++p) out[p] = std::exp(x[p]);
}

template <>
__attribute__((always_inline)) inline void exp_body<double>(const double* x, double* out, int64_t count) {
  for (int64_t p = 0; p < count; ++p) out[p] = std::exp(x[p]);
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void exp_of(const float* x, float* out, int64_t count) {
  exp_body(x, out, count);
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void exp_of(const double* x, double* out, int64_t count) {
  exp_body(x, out, count);
}

// ---------------------------------------------------------------------------- one anchor
template <typename acc_t>
struct Key {
  acc_t d;
  int64_t k;
};

// The inputs in the arithmetic type: features Z [m, D], labels Y [m, L]; with one label (L = 1)
// and every label finite, the rows in label order (row[q + 1] the q-th, q = place[k] for row k)
// and their labels (label[q + 1]) between two sentinels, -inf and +inf, so that a row's keys come
// sorted by label distance from a merge instead of a sort.
template <typename acc_t>
struct Problem {
  const acc_t* Z;
  const acc_t* Y;
  int64_t m, D, L;
  acc_t temperature;
  std::vector<int64_t> row, place;
  std::vector<acc_t> label;

  Problem(const acc_t* z, const acc_t* y, int64_t m_, int64_t d, int64_t l, acc_t t)
      : Z(z), Y(y), m(m_), D(d), L(l), temperature(t) {
    if (L != 1) return;
    for (int64_t k = 0; k < m; ++k) {
      if (!std::isfinite(Y[k])) return;
    }
    std::vector<int64_t> by_label(m);
    for (int64_t k = 0; k < m; ++k) by_label[k] = k;
    std::sort(by_label.begin(), by_label.end(),
              [&](int64_t a, int64_t b) { return Y[a] < Y[b] || (Y[a] == Y[b] && a < b); });
    row.assign(m + 2, 0);
    place.resize(m);
    label.resize(m + 2);
    label[0] = -std::numeric_limits<acc_t>::infinity();
    label[m + 1] = std::numeric_limits<acc_t>::infinity();
    for (int64_t q = 0; q < m; ++q) {
      place[by_label[q]] = q;
      row[q + 1] = by_label[q];
      label[q + 1] = Y[by_label[q]];
    }
  }
};

// The scratch of one thread, for rows of m keys; the arrays are in the keys' sorted order: the
// distances r, the running minimum from the end, exponents and their exps, and per key its tie
// group's S as (low, total, log total).
template <typename acc_t>
struct Row {
  std::vector<acc_t> r, run_low, x, e, low, total, log_total;
  std::vector<Key<acc_t>> keys;
  explicit Row(int64_t m) : r(m), run_low(m), x(m), e(m), low(m), total(m), log_total(m), keys(m) {}
};

// The keys k != i of anchor i in order of label distance d_k = sum_l |y_il - y_kl| (summed in label
// order, as every kernel does, so ties are exact ties), NaN distances last, and rk[p] = r[keys[p].k].
// With one finite label: a merge of the rows below i and above i in label order, outwards, without
// branches (O(m)); else a sort by (d, k).
template <typename acc_t>
void sort_keys(const Problem<acc_t>& pb, int64_t i, const acc_t* r, Key<acc_t>* keys, acc_t* rk) {
  const acc_t* yi = pb.Y + i * pb.L;
  const int64_t n = pb.m - 1;
  if (!pb.row.empty()) {
    const acc_t y = yi[0];
    const acc_t* label = pb.label.data();
    const int64_t* row = pb.row.data();
    int64_t below = pb.place[i], above = pb.place[i] + 2;  // in the padded order
    for (int64_t p = 0; p < n; ++p) {
      const acc_t db = y - label[below], da = label[above] - y;  // |y - y_k| exactly; inf at a sentinel
      // no branch (a coin toss for the predictor): masks select the side
      const int64_t take_below = -static_cast<int64_t>(db <= da);
      const int64_t q = above ^ ((below ^ above) & take_below), k = row[q];
      keys[p] = Key<acc_t>{da < db ? da : db, k};
      rk[p] = r[k];
      below += take_below;
      above += 1 + take_below;
    }
    return;
  }
  int64_t c = 0;
  for (int64_t k = 0; k < pb.m; ++k) {
    if (k == i) continue;
    const acc_t* yk = pb.Y + k * pb.L;
    acc_t d = std::abs(yi[0] - yk[0]);
    for (int64_t l = 1; l < pb.L; ++l) d += std::abs(yi[l] - yk[l]);
    keys[c++] = Key<acc_t>{d, k};
  }
  std::sort(keys, keys + n, [](const Key<acc_t>& a, const Key<acc_t>& b) {
    if (a.d < b.d) return true;
    if (b.d < a.d) return false;
    const bool nan_a = std::isnan(a.d), nan_b = std::isnan(b.d);
    if (nan_a != nan_b) return nan_b;  // a total order: NaN after every number
    return a.k < b.k;
  });
  for (int64_t p = 0; p < n; ++p) rk[p] = r[keys[p].k];
}

// For anchor row i with distances r (its row of R): the keys sorted by label distance, their
// distances r (sorted) and S of each sorted key as (low, total, log total), shared by its tie
// group. A pair whose label distance is NaN gets a NaN distance, so a NaN label makes every loss
// it reaches NaN. Returns the number of keys, m - 1.
template <typename acc_t>
DIRFAST_NOINLINE int64_t sorted_row(const Problem<acc_t>& pb, int64_t i, const acc_t* r, Row<acc_t>& row) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t* rk = row.r.data();
  sort_keys(pb, i, r, row.keys.data(), rk);
  const int64_t n = pb.m - 1;
  for (int64_t p = n - 1; p >= 0 && std::isnan(row.keys[p].d); --p) {  // a NaN label: the pair's distance is NaN
    rk[p] = std::numeric_limits<acc_t>::quiet_NaN();
  }
  const acc_t t = pb.temperature;
  acc_t* low = row.run_low.data();
  acc_t* x = row.x.data();
  // low[p]: the smallest distance from p to the end (NaN skipped); x[p] = (low[p] - r[p]) / t <= 0.
  acc_t running = inf;
  for (int64_t p = n - 1; p >= 0; --p) {
    running = rk[p] < running ? rk[p] : running;
    low[p] = running;
  }
  for (int64_t p = 0; p < n; ++p) x[p] = rk[p] == inf ? -inf : (low[p] - rk[p]) / t;
  exp_of(x, row.e.data(), n);
  // From the end, a tie group at a time: S of a group is the sum over it and every key after it,
  // kept as exp(-level / t) * sum, the level the smallest distance so far.
  const acc_t* e = row.e.data();
  acc_t level = inf, sum = 0;
  for (int64_t end = n; end > 0;) {
    int64_t start = end - 1;
    while (start > 0 && row.keys[start - 1].d == row.keys[end - 1].d) --start;
    for (int64_t p = end - 1; p >= start; --p) {
      if (low[p] != level) {  // a new minimum (low only falls towards the start)
        if (level != inf) sum *= std::exp((low[p] - level) / t);
        level = low[p];
      }
      sum += e[p];
    }
    const acc_t log_sum = std::log(sum);
    for (int64_t p = start; p < end; ++p) {
      row.low[p] = level;
      row.total[p] = sum;
      row.log_total[p] = log_sum;
    }
    end = start;
  }
  return n;
}

template <typename acc_t>
DIRFAST_NOINLINE void forward_rows(const Problem<acc_t>& pb, acc_t* R, acc_t* out, int64_t offset, int64_t count,
                                   int64_t grain) {
  parallel_for_pieces(count, grain, [&](auto next) {
    Row<acc_t> row(pb.m);
    for (int64_t first, last; next(first, last);) {
      for (int64_t a = first; a < last; ++a) {
        const int64_t n = sorted_row(pb, offset + a, R + a * pb.m, row);
        acc_t spread = 0, logs = 0;  // both sums >= 0: nothing cancels, and t divides last
        for (int64_t p = 0; p < n; ++p) {
          spread += row.r[p] - row.low[p];
          logs += row.log_total[p];
        }
        out[a] = spread / acc_t(n) / pb.temperature + logs / acc_t(n);
      }
    }
  });
}

// Phase 1 of the backward: w[a][k] = dL/ds_k / r_k for anchor a (0 for the anchor itself and
// where r_k = 0), with dL/ds_k = c (exp(s_k) sum_{j: d_j <= d_k} 1 / S_j - 1), c = grad[a] / (m - 1):
// exp(s_k) sum_j 1 / S_j = A exp((low_k - r_k) / t), A = sum_j exp((low_j - low_k) / t) / total_j
// (low grows along the row, so every exponent is <= 0).
template <typename acc_t>
DIRFAST_NOINLINE void backward_weights(const Problem<acc_t>& pb, acc_t* R, const acc_t* grad, acc_t* w,
                                       int64_t offset, int64_t count, int64_t grain) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t m = pb.m;
  parallel_for_pieces(count, grain, [&](auto next) {
    Row<acc_t> row(m);
    for (int64_t first, last; next(first, last);) {
      for (int64_t a = first; a < last; ++a) {
        const int64_t i = offset + a;
        const int64_t n = sorted_row(pb, i, R + a * m, row);
        const acc_t c = grad[a] / acc_t(n), t = pb.temperature;
        acc_t* wa = w + a * m;
        wa[i] = 0;
        acc_t level = 0, prefix = 0;  // A over the groups so far, at the last group's low
        for (int64_t start = 0; start < n;) {
          int64_t end = start + 1;
          while (end < n && row.keys[end].d == row.keys[start].d) ++end;
          const acc_t low = row.low[start];
          if (start > 0 && low != level) prefix *= std::exp((level - low) / t);
          level = low;
          prefix += acc_t(end - start) / row.total[start];  // one S for the whole group
          for (int64_t p = start; p < end; ++p) {
            row.x[p] = row.r[p] == inf ? -inf : (low - row.r[p]) / t;
            row.run_low[p] = prefix;  // A of the group, in place of the running minimum
          }
          start = end;
        }
        exp_of(row.x.data(), row.e.data(), n);
        for (int64_t p = 0; p < n; ++p) {  // in place of x: w in the sorted order
          const acc_t ds = c * (row.run_low[p] * row.e[p] - acc_t(1)), rk = row.r[p];
          row.x[p] = rk == 0 ? acc_t(0) : ds / rk;  // over t in backward_rows, once per element
        }
        for (int64_t p = 0; p < n; ++p) wa[row.keys[p].k] = row.x[p];
      }
    }
  });
}

// Phase 2: grad[r] = sum_p b_rp (z_p - z_r) for R rows r (b: R rows of partners), the terms in
// the order of p, each a fused multiply-add; 2 vectors of R rows in registers, then 1, then the
// tail element by element. grad's rows hold the sum so far (the partners come in chunks).
template <typename T, int Rows>
__attribute__((always_inline)) inline void add_pairs_rows(const T* const* zr, const T* Z, const T* const* b,
                                                          int64_t p0, int64_t p1, T* const* grad, int64_t D) {
  using V = typename Lanes<T>::vec;
  constexpr int64_t n = Lanes<T>::n;
  int64_t j = 0;
  for (; j + 2 * n <= D; j += 2 * n) {
    V x0[Rows], x1[Rows], a0[Rows], a1[Rows];
#pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) {
      x0[q] = load(zr[q] + j);
      x1[q] = load(zr[q] + j + n);
      a0[q] = load(grad[q] + j);
      a1[q] = load(grad[q] + j + n);
    }
    for (int64_t p = p0; p < p1; ++p) {
      const V y0 = load(Z + p * D + j), y1 = load(Z + p * D + j + n);
  #pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) {
        const V bq = splat<T>(b[q][p]);
        a0[q] = vfma<T>(bq, y0 - x0[q], a0[q]);
        a1[q] = vfma<T>(bq, y1 - x1[q], a1[q]);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) {
      store(grad[q] + j, a0[q]);
      store(grad[q] + j + n, a1[q]);
    }
  }
  for (; j + n <= D; j += n) {
    V x0[Rows], a0[Rows];
#pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) {
      x0[q] = load(zr[q] + j);
      a0[q] = load(grad[q] + j);
    }
    for (int64_t p = p0; p < p1; ++p) {
      const V y0 = load(Z + p * D + j);
  #pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) a0[q] = vfma<T>(splat<T>(b[q][p]), y0 - x0[q], a0[q]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) store(grad[q] + j, a0[q]);
  }
  for (; j < D; ++j) {
#pragma GCC unroll 4
    for (int q = 0; q < Rows; ++q) {
      T acc = grad[q][j];
      for (int64_t p = p0; p < p1; ++p) acc = std::fma(b[q][p], Z[p * D + j] - zr[q][j], acc);
      grad[q][j] = acc;
    }
  }
}

// Rows [r0, r1) against partners [p0, p1): b is [r1 - r0] rows of partners (indexed by p), ldb apart.
template <typename T>
__attribute__((always_inline)) inline void add_pairs_body(const T* Z, const T* b, int64_t ldb, int64_t r0, int64_t r1,
                                                          int64_t p0, int64_t p1, T* grad, int64_t D) {
  int64_t r = r0;
  for (; r + 3 <= r1; r += 3) {
    const T* zr[3] = {Z + r * D, Z + (r + 1) * D, Z + (r + 2) * D};
    const T* br[3] = {b + (r - r0) * ldb, b + (r + 1 - r0) * ldb, b + (r + 2 - r0) * ldb};
    T* gr[3] = {grad + r * D, grad + (r + 1) * D, grad + (r + 2) * D};
    add_pairs_rows<T, 3>(zr, Z, br, p0, p1, gr, D);
  }
  for (; r < r1; ++r) {
    const T* zr[1] = {Z + r * D};
    const T* br[1] = {b + (r - r0) * ldb};
    T* gr[1] = {grad + r * D};
    add_pairs_rows<T, 1>(zr, Z, br, p0, p1, gr, D);
  }
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void add_pairs(const float* Z, const float* b, int64_t ldb, int64_t r0, int64_t r1,
                                                  int64_t p0, int64_t p1, float* grad, int64_t D) {
  add_pairs_body(Z, b, ldb, r0, r1, p0, p1, grad, D);
}

DIRFAST_V3_CLONES DIRFAST_NOINLINE void add_pairs(const double* Z, const double* b, int64_t ldb, int64_t r0,
                                                  int64_t r1, int64_t p0, int64_t p1, double* grad, int64_t D) {
  add_pairs_body(Z, b, ldb, r0, r1, p0, p1, grad, D);
}

// Blocks of up to 32 rows, each of anchors only or of other rows only (the partners p where b_rp
// may be nonzero: every row for an anchor, the anchors for the others); per block b in a
// thread's buffer (w's columns read 32 at a time), then the partners 64 at a time, then / t.
template <typename acc_t>
DIRFAST_NOINLINE void backward_rows(const acc_t* Z, const acc_t* w, acc_t* grad, int64_t m, int64_t D,
                                    int64_t offset, int64_t count, acc_t temperature) {
  constexpr int64_t B = 32, P = 64;
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, offset}, {offset, offset + count},
                               {offset + count, m}}) {
    for (int64_t r0 = lo; r0 < hi; r0 += B) blocks.emplace_back(r0, std::min(r0 + B, hi));
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (B * m * (D + 4)));
  parallel_for_pieces(static_cast<int64_t>(blocks.size()), grain, [&](auto next) {
    // b's rows are ldb apart, an odd number of 16 elements, so that the column writes below do
    // not all fall into the same few cache sets.
    const int64_t ldb = (m + 15) / 16 % 2 ? (m + 15) / 16 * 16 : (m + 15) / 16 * 16 + 16;
    std::vector<acc_t> b(B * ldb);
    for (int64_t first, last; next(first, last);) {
      for (int64_t t = first; t < last; ++t) {
        const auto [r0, r1] = blocks[t];
        const bool anchor = r0 >= offset && r0 < offset + count;
        const int64_t lo = anchor ? 0 : offset, hi = anchor ? m : offset + count;
        for (int64_t r = r0; r < r1; ++r) {
          acc_t* br = b.data() + (r - r0) * ldb;
          for (int64_t p = lo; p < hi; ++p) br[p] = anchor ? w[(r - offset) * m + p] : acc_t(0);
        }
        for (int64_t p = std::max(lo, offset); p < std::min(hi, offset + count); ++p) {
          const acc_t* wp = w + (p - offset) * m;
          for (int64_t r = r0; r < r1; ++r) b[(r - r0) * ldb + p] += wp[r];
        }
        std::fill(grad + r0 * D, grad + r1 * D, acc_t(0));
        for (int64_t p0 = lo; p0 < hi; p0 += P) add_pairs(Z, b.data(), ldb, r0, r1, p0, std::min(p0 + P, hi), grad, D);
        for (acc_t* g = grad + r0 * D; g < grad + r1 * D; ++g) *g /= temperature;
      }
    }
  });
}

// Anchors per task in the row passes: about 2^15 steps at least, so small inputs run on one thread.
int64_t grain_for(int64_t m) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, m * 16)); }

Tensor rnc_loss_cpu(const Tensor& features, const Tensor& labels, double temperature, int64_t offset, int64_t count) {
  const char* op = "dirfast::rnc_loss";
  check_rnc_args(features, labels, temperature, offset, count, op);
  const ScalarType acc = acc_type({features.scalar_type(), labels.scalar_type()});
  Tensor out = torch::stable::new_zeros(features, {count}, acc);
  const int64_t m = features.size(0), D = features.size(1), L = labels.size(1);
  if (count == 0 || m < 2) return out;
  const Tensor z = contiguous_as(features, acc), y = contiguous_as(labels, acc);
  Tensor r = torch::stable::new_empty(features, {count, m}, acc);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const Problem<acc_t> pb(z.const_data_ptr<acc_t>(), y.const_data_ptr<acc_t>(), m, D, L,
                            static_cast<acc_t>(temperature));
    fill_distances(pb.Z, m, D, offset, count, r.mutable_data_ptr<acc_t>());
    forward_rows<acc_t>(pb, r.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), offset, count, grain_for(m));
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
  Tensor r = torch::stable::new_empty(features, {count, m}, acc);
  Tensor w = torch::stable::new_empty(features, {count, m}, acc);
  Tensor total = torch::stable::new_empty(features, {m, D}, acc);
  dispatch_acc(acc, [&](auto acc_scalar) {
    using acc_t = decltype(acc_scalar);
    const acc_t* pz = z.const_data_ptr<acc_t>();
    const Problem<acc_t> pb(pz, y.const_data_ptr<acc_t>(), m, D, L, static_cast<acc_t>(temperature));
    fill_distances(pz, m, D, offset, count, r.mutable_data_ptr<acc_t>());
    backward_weights<acc_t>(pb, r.mutable_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>(),
                            offset, count, grain_for(m));
    backward_rows<acc_t>(pz, w.const_data_ptr<acc_t>(), total.mutable_data_ptr<acc_t>(), m, D, offset, count,
                         pb.temperature);
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
