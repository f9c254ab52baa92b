// Long rows reduced bucket by bucket on CPU (bin_stats and accumulate_bin_stats_): each bucket's
// rows listed in row order, cut into segments fixed by the shapes (one large bucket still splits
// over threads, and the bits do not depend on how many there are), each segment reduced by
// Welford's update through its list of row numbers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "macros.h"
#include "welford.h"

namespace dirfast {
namespace cpu {

constexpr int64_t kLongRowBytes = 256;            // rows this long are gathered by bucket
constexpr int64_t kPrefetchBytes = 8192;          // gathered rows are prefetched this far ahead
constexpr int64_t kMaxSegments = 16;              // segments of one bucket, at most
constexpr int64_t kMinSegmentElements = 1 << 15;  // elements a segment holds, at least
constexpr int64_t kMinTaskElements = 1 << 15;     // elements a parallel task gets, at least

// Rows of a segment: a bucket with more is reduced in several.
inline int64_t segment_rows(int64_t rows, int64_t dim) {
  const int64_t d = std::max<int64_t>(dim, 1);
  return std::max<int64_t>({1, (rows + kMaxSegments - 1) / kMaxSegments, (kMinSegmentElements + d - 1) / d});
}

// Groups of rows (group g at sorted positions [group_start[g], group_start[g + 1])) cut every
// `seg` rows: segment s covers positions [start[s], start[s + 1]) of group[s]; group g's
// segments are [first[g], first[g + 1]) (none for an empty group).
struct Segments {
  std::vector<int64_t> start, group, first;

  Segments(const int64_t* group_start, int64_t groups, int64_t seg) : first(groups + 1) {
    const int64_t listed = group_start[groups] - group_start[0];
    start.reserve(std::min(groups, listed) + listed / seg + 1);
    group.reserve(std::min(groups, listed) + listed / seg);
    for (int64_t g = 0; g < groups; ++g) {
      first[g] = count();
      for (int64_t p = group_start[g]; p < group_start[g + 1]; p += seg) {
        start.push_back(p);
        group.push_back(g);
      }
    }
    first[groups] = count();
    start.push_back(group_start[groups]);
  }

  int64_t count() const { return static_cast<int64_t>(group.size()); }
  int64_t rows(int64_t s) const { return start[s + 1] - start[s]; }
  // Whether segment s holds all of its group's rows.
  bool whole(int64_t s) const { return first[group[s] + 1] - first[group[s]] == 1; }
  // The segments [s0, s1) that start in sorted positions [begin, end).
  std::pair<int64_t, int64_t> starting_in(int64_t begin, int64_t end) const {
    const int64_t* lo = start.data();
    const int64_t* hi = lo + count();
    return {std::lower_bound(lo, hi, begin) - lo, std::lower_bound(lo, hi, end) - lo};
  }
};

// Rows prefetched ahead of the one taken when rows of `row_bytes` are read in a jumping order.
inline int64_t prefetch_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(16, kPrefetchBytes / std::max<int64_t>(row_bytes, 1)));
}

// Welford's mean and M2 of the n >= 1 rows of x listed at `list` (row numbers, rows `stride`
// apart), into mean and m2, four rows per pass over the accumulators: shifted updates (welford.h)
// by `shift` (a row of D shifts), or plain ones where it is null. The list jumps around x:
// every line of the row `ahead` places further in the list (up to `list_end`) is prefetched into
// L2 for each row taken, and the first `ahead` rows' too when `warm_up` (a task's first list):
// the first line alone, the rest left to the hardware, comes too late for rows in random order
// (benchmarks/results/cpu/grouped-rows-zen4.md). The prefetches are written out here, not in a
// helper: g++ finds a function that only prefetches free of side effects and drops it. Always
// inlined, so each clone of reduce_list holds its own copy: left to g++, the clones of one file or
// another tail-call a single copy compiled for the baseline
// (benchmarks/results/cpu/native-baseline-zen4.md).
template <typename acc_t, typename in_t, typename shift_t>
__attribute__((always_inline)) inline void reduce_list_body(const in_t* x, int64_t stride, int64_t dim,
                                                            const int64_t* list, int64_t n, const int64_t* list_end,
                                                            bool warm_up, const shift_t* DIRFAST_RESTRICT shift,
                                                            acc_t* DIRFAST_RESTRICT mean,
                                                            acc_t* DIRFAST_RESTRICT m2) {
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(in_t));
  const int64_t ahead = prefetch_rows(row_bytes);
  const int64_t* last = list_end - 1;
  for (int64_t i = warm_up ? 0 : ahead; i <= ahead; ++i) {
    const char* row = reinterpret_cast<const char*>(x + *std::min(list + i, last) * stride);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
  welford_row_init<acc_t, in_t, shift_t>(mean, m2, x + list[0] * stride, shift, dim);
  int64_t i = 1;
  for (; i + 4 <= n; i += 4) {
    for (int64_t j = 0; j < 4; ++j) {
      const char* row = reinterpret_cast<const char*>(x + *std::min(list + i + ahead + j, last) * stride);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    }
    const acc_t inv[4] = {acc_t(1) / static_cast<acc_t>(i + 1), acc_t(1) / static_cast<acc_t>(i + 2),
                          acc_t(1) / static_cast<acc_t>(i + 3), acc_t(1) / static_cast<acc_t>(i + 4)};
    welford_row_add4<acc_t, in_t, shift_t>(mean, m2, x + list[i] * stride, x + list[i + 1] * stride,
                                           x + list[i + 2] * stride, x + list[i + 3] * stride, shift, dim, inv);
  }
  for (; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(x + *std::min(list + i + ahead, last) * stride);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    welford_row_add<acc_t, in_t, shift_t>(mean, m2, x + list[i] * stride, shift, dim,
                                          acc_t(1) / static_cast<acc_t>(i + 1));
  }
}

}  // namespace cpu
}  // namespace dirfast

// reduce_list(...) for rows of in_t and accumulators of acc_t, in both clones: expanded in the
// kernel's file (inside its namespace) for each type pair it reads.
#define DIRFAST_REDUCE_LIST(in_t, acc_t)                                                                 \
  DIRFAST_V3_CLONES DIRFAST_NOINLINE void reduce_list(const in_t* x, int64_t stride, int64_t dim,        \
                                                      const int64_t* list, int64_t n,                    \
                                                      const int64_t* list_end, bool warm_up,             \
                                                      const acc_t* shift, acc_t* mean, acc_t* m2) {      \
    if (shift == nullptr) {                                                                              \
      reduce_list_body<acc_t, in_t, NoShift>(x, stride, dim, list, n, list_end, warm_up, nullptr, mean, m2); \
    } else {                                                                                             \
      reduce_list_body<acc_t, in_t, acc_t>(x, stride, dim, list, n, list_end, warm_up, shift, mean, m2); \
    }                                                                                                    \
  }

// unshift_row(...) for accumulators of acc_t (welford.h's welford_row_unshift: a bucket's mean from
// the running mean of its shifted updates), in both clones: expanded in the kernel's file as above.
#define DIRFAST_UNSHIFT_ROW(acc_t)                                                                       \
  DIRFAST_V3_CLONES DIRFAST_NOINLINE void unshift_row(acc_t* DIRFAST_RESTRICT mean,                      \
                                                      const acc_t* DIRFAST_RESTRICT shift, int64_t dim) { \
    welford_row_unshift<acc_t>(mean, shift, dim);                                                        \
  }
