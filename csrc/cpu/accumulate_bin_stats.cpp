// dirfast::accumulate_bin_stats_ on CPU: a batch's per-bucket moments merged into running (count,
// mean, M2) tables in place, with no temporary the size of the tables.
//
// Two ways to the batch's moments, chosen by the shapes:
//   Grouped (rows of 256 bytes or more, or fewer rows than buckets): the rows of each met bucket
//     listed in row order (a counting sort when the buckets are few for the rows, a sort of
//     (bucket, row) pairs otherwise, so a batch against 10,000 buckets costs its rows), cut into
//     segments of at most `seg` rows (fixed by the shapes: one large bucket still splits over
//     threads), each segment reduced by Welford's update in row order. A bucket of one segment is
//     merged into the tables by the task that reduced it, while its moments are in cache; the
//     segments of a larger bucket are merged in order (Chan) afterwards, then into the tables.
//   Whole tables (dense planes, short rows, more rows than buckets): bin_stats' CPU kernel, which
//     reads planes in place and short rows in order, then every bucket that met rows merged.
// The merge into the tables (Chan's, as chan_merge in dirfast/ops/accumulate_bin_stats.py) is
// checked before it is written: a bucket whose merged mean or M2 is not finite in the tables'
// dtype keeps what it had, and its rows are counted as skipped. The same bits for any number of
// threads. Arithmetic in float32, or float64 when x or the tables are float64.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

// No a * b + c is fused: the same bits on every CPU (above the project's headers: their functions too).
#pragma GCC optimize("fp-contract=off")

#include "bucket_rows.h"
#include "checks.h"
#include "layout.h"
#include "parallel.h"
#include "welford.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kCountingSortRows = 4;      // a counting sort while buckets <= this x rows
constexpr int64_t kCountingSortSlack = 4096;  // ... + this (few buckets: a small array)

// The rows of each met bucket, in row order: bucket met[j]'s rows are order[start[j], start[j + 1]).
struct Grouped {
  std::vector<int64_t> order, met, start;
};

template <typename index_t>
Grouped group_by_bucket(const index_t* idx, int64_t rows, int64_t num_bins) {
  Grouped g;
  auto bucket = [&](int64_t r) {
    const int64_t k = static_cast<int64_t>(idx[r]);
    return (k >= 0 && k < num_bins) ? k : int64_t(-1);
  };
  if (num_bins <= kCountingSortRows * rows + kCountingSortSlack) {
    std::vector<int64_t> first(num_bins + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t k = bucket(r);
      if (k >= 0) ++first[k + 1];
    }
    for (int64_t k = 0; k < num_bins; ++k) {
      if (first[k + 1] > 0) {
        g.met.push_back(k);
        g.start.push_back(first[k]);
      }
      first[k + 1] += first[k];
    }
    g.start.push_back(first[num_bins]);
    g.order.resize(first[num_bins]);
    list_rows_by_bucket(rows, first.data(), num_bins, bucket, g.order.data());
    return g;
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (bucket, row): sorted, rows stay in order
  pairs.reserve(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t k = bucket(r);
    if (k >= 0) pairs.emplace_back(k, r);
  }
  std::sort(pairs.begin(), pairs.end());
  g.order.resize(pairs.size());
  for (size_t i = 0; i < pairs.size(); ++i) {
    g.order[i] = pairs[i].second;
    if (i == 0 || pairs[i].first != pairs[i - 1].first) {
      g.met.push_back(pairs[i].first);
      g.start.push_back(static_cast<int64_t>(i));
    }
  }
  g.start.push_back(static_cast<int64_t>(pairs.size()));
  return g;
}

// The merged mean and M2 of one feature: Chan's formula in acc_t, rounded to held_t.
template <typename acc_t, typename held_t>
inline void chan_merge_value(held_t mean_a, held_t m2_a, acc_t mean_b, acc_t m2_b, acc_t share, acc_t cross,
                             held_t& mean, held_t& m2) {
  const acc_t delta = mean_b - static_cast<acc_t>(mean_a);
  mean = static_cast<held_t>(static_cast<acc_t>(mean_a) + delta * share);
  m2 = static_cast<held_t>(static_cast<acc_t>(m2_a) + (m2_b + delta * delta * cross));
}

// Whether every merged mean and M2 of a row is finite in held_t: x * 0 sums to 0 exactly then
// (inf * 0 is NaN), in kLanes partial sums (a NaN reaches the total in any order; one sum in order
// would wait on each add). Computed without storing anything, so a row that fails leaves no trace.
template <typename acc_t, typename held_t>
__attribute__((always_inline))
inline bool merge_row_finite_body(const held_t* DIRFAST_RESTRICT mean_a, const held_t* DIRFAST_RESTRICT m2_a,
                                  const acc_t* DIRFAST_RESTRICT mean_b, const acc_t* DIRFAST_RESTRICT m2_b,
                                  int64_t dim, acc_t share, acc_t cross) {
  constexpr int64_t kLanes = 16;
  held_t zero[kLanes] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
    const int64_t lanes = std::min(kLanes, dim - d0);
    for (int64_t l = 0; l < lanes; ++l) {
      held_t mean, m2;
      chan_merge_value<acc_t, held_t>(mean_a[d0 + l], m2_a[d0 + l], mean_b[d0 + l], m2_b[d0 + l], share, cross, mean,
                                      m2);
      zero[l] += mean * held_t(0) + m2 * held_t(0);
    }
  }
  held_t total = held_t(0);
  for (int64_t l = 0; l < kLanes; ++l) total += zero[l];
  return total == held_t(0);
}

// The merged row written over the running one.
template <typename acc_t, typename held_t>
__attribute__((always_inline))
inline void merge_row_body(held_t* DIRFAST_RESTRICT mean_a, held_t* DIRFAST_RESTRICT m2_a,
                           const acc_t* DIRFAST_RESTRICT mean_b, const acc_t* DIRFAST_RESTRICT m2_b, int64_t dim,
                           acc_t share, acc_t cross) {
  for (int64_t d = 0; d < dim; ++d) {
    chan_merge_value<acc_t, held_t>(mean_a[d], m2_a[d], mean_b[d], m2_b[d], share, cross, mean_a[d], m2_a[d]);
  }
}

// The compiled loops in both clones (x86-64-v3 and the baseline), one overload per type pair.
#define DIRFAST_MERGE_ROW(acc_t, held_t)                                                               \
  DIRFAST_V3_CLONES DIRFAST_NOINLINE bool merge_row_finite(const held_t* mean_a, const held_t* m2_a,   \
                                                           const acc_t* mean_b, const acc_t* m2_b,     \
                                                           int64_t dim, acc_t share, acc_t cross) {    \
    return merge_row_finite_body<acc_t, held_t>(mean_a, m2_a, mean_b, m2_b, dim, share, cross);        \
  }                                                                                                    \
  DIRFAST_V3_CLONES DIRFAST_NOINLINE void merge_row(held_t* mean_a, held_t* m2_a, const acc_t* mean_b, \
                                                    const acc_t* m2_b, int64_t dim, acc_t share,       \
                                                    acc_t cross) {                                     \
    merge_row_body<acc_t, held_t>(mean_a, m2_a, mean_b, m2_b, dim, share, cross);                      \
  }
DIRFAST_REDUCE_LIST(float, float)
DIRFAST_REDUCE_LIST(float, double)
DIRFAST_REDUCE_LIST(double, double)
DIRFAST_REDUCE_LIST(c10::Half, float)
DIRFAST_REDUCE_LIST(c10::Half, double)
DIRFAST_REDUCE_LIST(c10::BFloat16, float)
DIRFAST_REDUCE_LIST(c10::BFloat16, double)
DIRFAST_UNSHIFT_ROW(float)
DIRFAST_UNSHIFT_ROW(double)
DIRFAST_MERGE_ROW(float, float)
DIRFAST_MERGE_ROW(double, float)
DIRFAST_MERGE_ROW(double, double)
#undef DIRFAST_MERGE_ROW

// The running tables of a call: count [B] float64, mean and M2 [B, D] in held_t, contiguous.
template <typename held_t>
struct Running {
  double* count;
  held_t* mean;
  held_t* m2;
  int64_t dim;
};

// A batch's moments of bucket k (n rows: mean_b, m2_b) merged into the running tables by Chan's
// formula, in acc_t with the weights in float64 (as chan_merge in dirfast/ops/accumulate_bin_stats.py), when
// every merged value is finite in held_t (checked first: nothing is written otherwise). Returns
// whether it was merged.
template <typename acc_t, typename held_t>
bool merge_bucket(const Running<held_t>& run, int64_t k, int64_t n, const acc_t* mean_b, const acc_t* m2_b) {
  const int64_t dim = run.dim;
  const double n_a = run.count[k], n_b = static_cast<double>(n);
  const double total = n_a + n_b;
  const acc_t share = static_cast<acc_t>(n_b / std::max(total, 1.0));
  const acc_t cross = static_cast<acc_t>(n_a * n_b / std::max(total, 1.0));
  held_t* mean_a = run.mean + k * dim;
  held_t* m2_a = run.m2 + k * dim;
  if (!merge_row_finite(mean_a, m2_a, mean_b, m2_b, dim, share, cross)) return false;
  merge_row(mean_a, m2_a, mean_b, m2_b, dim, share, cross);
  run.count[k] = total;
  return true;
}

// The grouped path: the moments of each met bucket's rows, merged into the running tables.
template <typename scalar_t, typename acc_t, typename held_t, typename index_t>
int64_t accumulate_grouped(const scalar_t* x, int64_t stride, int64_t rows, const index_t* idx, int64_t num_bins,
                   const Running<held_t>& run) {
  const int64_t dim = run.dim;
  const Grouped g = group_by_bucket(idx, rows, num_bins);
  const int64_t valid = static_cast<int64_t>(g.order.size());
  const int64_t met = static_cast<int64_t>(g.met.size());
  // Met bucket j's rows cut into segments (segs.group[s] is j: an index into g.met).
  const int64_t d1 = std::max<int64_t>(dim, 1);
  const Segments segs(g.start.data(), met, segment_rows(rows, dim));
  const int64_t segments = segs.count();
  // The moments of the segments of buckets with more than one, side by side (2 D values each).
  std::vector<int64_t> slot(segments, -1);
  int64_t stored = 0;
  for (int64_t s = 0; s < segments; ++s) {
    if (!segs.whole(s)) slot[s] = stored++;
  }
  std::unique_ptr<acc_t[]> table(new acc_t[std::max<int64_t>(stored * 2 * d1, 1)]);
  std::atomic<int64_t> skipped{rows - valid};
  // Plain updates, as bin_stats runs them; a bucket far from zero again with shifted ones, in every
  // segment, by the shifts bin_stats takes (welford_row_shift, from the plain mean and M2).
  auto reduce_segment = [&](int64_t s, bool warm_up, const acc_t* shift, acc_t* mean) {
    reduce_list(x, stride, dim, g.order.data() + segs.start[s], segs.rows(s), g.order.data() + valid, warm_up,
                shift, mean, mean + d1);
  };

  // Each task takes the segments that start in its range of sorted positions.
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / d1);
  parallel_for_pieces(valid, grain, [&](auto next) {
    std::unique_ptr<acc_t[]> moments(new acc_t[2 * d1]), shift(new acc_t[d1]);
    int64_t left_out = 0;
    for (int64_t begin, end; next(begin, end);) {
      const auto [s0, s1] = segs.starting_in(begin, end);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t n = segs.rows(s);
        acc_t* mean = slot[s] < 0 ? moments.get() : table.get() + slot[s] * 2 * d1;
        const int64_t j = segs.group[s];
        reduce_segment(s, s == s0, nullptr, mean);
        if (slot[s] >= 0) continue;  // merged with the bucket's other segments below
        // Not redone: a non-finite plain mean is refused by merge_bucket as it is.
        if (welford_row_shift<acc_t>(shift.get(), mean, mean + d1, n, dim)) {
          reduce_segment(s, false, shift.get(), mean);
          unshift_row(mean, shift.get(), dim);
        }
        if (!merge_bucket<acc_t, held_t>(run, g.met[j], n, mean, mean + d1)) left_out += n;
      }
    }
    skipped += left_out;
  });

  // Buckets of several segments: merged in order (fixed: the bits do not depend on the threads),
  // then into the tables.
  std::vector<int64_t> split;
  for (int64_t j = 0; j < met; ++j) {
    if (segs.first[j + 1] - segs.first[j] > 1) split.push_back(j);
  }
  parallel_for_pieces(static_cast<int64_t>(split.size()), 1, [&](auto next) {
    std::unique_ptr<acc_t[]> shift(new acc_t[d1]);
    int64_t left_out = 0;
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = split[i];
        const int64_t s0 = segs.first[j], s1 = segs.first[j + 1];
        acc_t* mean = table.get() + slot[s0] * 2 * d1;
        auto merge_segments = [&] {
          int64_t n = segs.rows(s0);
          for (int64_t s = s0 + 1; s < s1; ++s) {
            const int64_t nb = segs.rows(s);
            const acc_t* other = table.get() + slot[s] * 2 * d1;
            chan_merge_row<acc_t>(mean, mean + d1, other, other + d1, dim, chan_weights<acc_t>(n, nb));
            n += nb;
          }
          return n;
        };
        const int64_t n = merge_segments();
        if (welford_row_shift<acc_t>(shift.get(), mean, mean + d1, n, dim)) {
          for (int64_t s = s0; s < s1; ++s) reduce_segment(s, s == s0, shift.get(), table.get() + slot[s] * 2 * d1);
          merge_segments();
          unshift_row(mean, shift.get(), dim);
        }
        if (!merge_bucket<acc_t, held_t>(run, g.met[j], n, mean, mean + d1)) left_out += n;
      }
    }
    skipped += left_out;
  });
  return skipped.load();
}

// The whole-table path: the batch's count, mean and variance of every bucket from bin_stats (its
// CPU kernel, through the dispatcher: it reads dense planes in place and short rows in order, into
// per-chunk tables), M2 = var (n - 1) as the composite takes it, and each bucket that met rows
// merged into the running tables.
template <typename acc_t, typename held_t>
int64_t merge_bin_stats(const Tensor& count_b, const Tensor& mean_b, const Tensor& var_b, int64_t rows,
                        const Running<held_t>& run) {
  const int64_t num_bins = count_b.size(0), dim = run.dim, d1 = std::max<int64_t>(dim, 1);
  const int64_t* n_b = count_b.const_data_ptr<int64_t>();
  const acc_t* means = mean_b.const_data_ptr<acc_t>();
  const acc_t* vars = var_b.const_data_ptr<acc_t>();
  int64_t valid = 0;
  for (int64_t k = 0; k < num_bins; ++k) valid += n_b[k];
  std::atomic<int64_t> skipped{rows - valid};
  parallel_for_pieces(num_bins, std::max<int64_t>(1, kMinTaskElements / d1), [&](auto next) {
    std::unique_ptr<acc_t[]> m2(new acc_t[d1]);
    int64_t left_out = 0;
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t n = n_b[k];
        if (n == 0) continue;
        const acc_t* var = vars + k * dim;
        const acc_t rows_less_one = static_cast<acc_t>(n) - acc_t(1);
        for (int64_t d = 0; d < dim; ++d) m2[d] = var[d] * rows_less_one;
        if (!merge_bucket<acc_t, held_t>(run, k, n, means + k * dim, m2.get())) left_out += n;
      }
    }
    skipped += left_out;
  });
  return skipped.load();
}

// bin_stats(x, bin_idx, num_bins) through the dispatcher.
std::array<Tensor, 3> bin_stats_of(const Tensor& x, const Tensor& bin_idx, int64_t num_bins) {
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  std::array<StableIValue, 4> stack{from(x), from(bin_idx), from(num_bins), from(false)};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("dirfast::bin_stats", "", stack.data(), TORCH_ABI_VERSION));
  return {to<Tensor>(stack[0]), to<Tensor>(stack[1]), to<Tensor>(stack[2])};
}

Tensor accumulate_bin_stats_cpu(Tensor count, Tensor mean, Tensor m2, const Tensor& x, const Tensor& bin_idx) {
  const char* op = "dirfast::accumulate_bin_stats_";
  check_accumulate_args(count, mean, m2, x, bin_idx, op, torch::headeronly::DeviceType::CPU);
  Tensor skipped = empty({}, ScalarType::Long, x);
  const int64_t num_bins = count.size(0);
  const Tensor idx = made_contiguous(bin_idx);
  // The tables written in place, or through contiguous copies written back at the end.
  Tensor count_c = made_contiguous(count), mean_c = made_contiguous(mean), m2_c = made_contiguous(m2);
  // Long rows, or fewer rows than buckets: grouped by bucket (a batch against many buckets costs
  // its rows). Otherwise (dense planes, short rows, many rows per bucket): bin_stats, then the merge.
  const Layout given = classify(x);
  const int64_t rows = given.rows;
  const bool grouped = rows < num_bins || (given.kind == Layout::kRows &&
                                           x.size(1) * static_cast<int64_t>(x.element_size()) >= kLongRowBytes);
  const bool wide = x.scalar_type() == ScalarType::Double || mean.scalar_type() == ScalarType::Double;
  const Tensor xr = grouped ? in_layout(x, Layout::kRows)  // x itself when it is rows already
                            : (wide ? in_dtype(x, ScalarType::Double) : x);  // acc_t's moments
  const Layout layout = classify(xr);
  std::array<Tensor, 3> batch;
  if (!grouped) batch = bin_stats_of(xr, idx, num_bins);
  int64_t left_out = 0;
  dispatch_float(x.scalar_type(), op, [&](auto scalar) {
    using scalar_t = decltype(scalar);
    dispatch_acc(mean.scalar_type(), [&](auto held) {
      using held_t = decltype(held);
      // acc_type(x, mean): float64 when either is.
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<held_t, double>, double, float>;
      const Running<held_t> run{count_c.mutable_data_ptr<double>(), mean_c.mutable_data_ptr<held_t>(),
                                m2_c.mutable_data_ptr<held_t>(), layout.dim};
      if (!grouped) {
        left_out = merge_bin_stats<acc_t, held_t>(batch[0], batch[1], batch[2], rows, run);
        return;
      }
      dispatch_index(idx.scalar_type(), [&](auto index) {
        using index_t = decltype(index);
        left_out = accumulate_grouped<scalar_t, acc_t, held_t, index_t>(
            xr.const_data_ptr<scalar_t>(), layout.row_stride, rows, idx.const_data_ptr<index_t>(), num_bins, run);
      });
    });
  });
  for (auto [table, written] : {std::pair{&count, &count_c}, std::pair{&mean, &mean_c}, std::pair{&m2, &m2_c}}) {
    if (written->data_ptr() != table->data_ptr()) torch::stable::copy_(*table, *written);
  }
  *skipped.mutable_data_ptr<int64_t>() = left_out;
  return skipped;
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("accumulate_bin_stats_", TORCH_BOX(&dirfast::cpu::accumulate_bin_stats_cpu));
}
