// Memory floors of calibrate_ at many buckets (issue 21): what the C++ kernel's two ways through
// 65,536 x 512 float32 rows with 10,000 buckets cost on this machine before any arithmetic, and
// what the ways it does not take would cost.
//
//   g++ -O3 -march=native -fno-math-errno -ffp-contract=off benchmarks/calibrate_floors.cpp -o /tmp/floors && /tmp/floors
//
// Prints medians of 11 single-threaded runs of: an in-place pass in row order (the yardstick,
// as x.mul_(1)); the rows grouped by bucket (a counting sort, so scattered over x), each
// prefetched into L2 four rows (8 KiB) before its turn as the kernel does; rows in order each
// reading its bucket's s and t from a 40 MB table at random (the table path); the same in P
// passes, each over the rows of a range of B / P buckets with a table of those buckets only
// (small enough for the last-level cache); the same in four passes over a slab of 128 features
// of every row (a 10 MB table per slab); the s and t of every bucket streamed from four [B, D]
// statistics tables (divide, clamp, square root); and a copy of x into fresh memory (what
// x.clone() does: the pages are faulted in as they are written) and into memory already written.
// A kernel that faults its output's pages one at a time and writes it with plain stores pays the
// clone's page faults (fresh minus already written) plus at least the cheaper of the grouped and
// table floors (it also reads its output's lines for ownership), so the last line bounds
// out-of-place calibrate / clone for such a kernel. The kernel no longer is one: it maps a fresh
// output's pages in one call (csrc/pages.h) and streams large float32 rows past the cache, below
// this bound (benchmarks/results/cpu/out-of-place-zen4.md).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

namespace {
constexpr long kRows = 65536, kDim = 512, kBuckets = 10000;

template <typename F>
double median_ms(F&& f) {
  std::vector<double> t;
  for (int rep = 0; rep < 11; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[5];
}

void apply(float* __restrict__ row, const float* __restrict__ s, const float* __restrict__ t, long n = kDim) {
  for (long d = 0; d < n; ++d) row[d] = row[d] * s[d] + t[d];
}

// Row r prefetched into L2, as the kernel's row loops do.
void prefetch_row(const float* row) {
  for (long d = 0; d < kDim; d += 16) __builtin_prefetch(row + d, 0, 2);
}

// The rows 0..kRows-1 listed by key (a stable counting sort over keys 0..count-1).
template <typename Key>
std::vector<long> rows_by(long count, Key key) {
  std::vector<long> order(kRows), first(count + 1, 0);
  for (long r = 0; r < kRows; ++r) ++first[key(r) + 1];
  std::partial_sum(first.begin(), first.end(), first.begin());
  for (long r = 0; r < kRows; ++r) order[first[key(r)]++] = r;
  return order;
}

// Bucket k's s and t from its statistics, kDim features apart in each table.
void scale_shift(const float* m1, const float* v1, const float* m2, const float* v2, float* st) {
  for (long d = 0; d < kDim; ++d) {
    const float root = std::sqrt(std::min(std::max(v2[d] / v1[d], 0.1f), 10.0f));
    st[d] = root;
    st[kDim + d] = m2[d] - m1[d] * root;
  }
  asm volatile("" : : "r"(st) : "memory");
}
}  // namespace

int main() {
  std::vector<float> x(kRows * kDim, 1.5f), table(2 * kBuckets * kDim, 1.0f), st(2 * kDim, 1.0f);
  std::vector<float> m1(kBuckets * kDim, 0.5f), v1(kBuckets * kDim, 1.5f), m2(kBuckets * kDim, 0.3f),
      v2(kBuckets * kDim, 2.0f);
  std::fill(st.begin() + kDim, st.end(), 0.0f);
  std::mt19937 g(1);
  std::vector<long> bucket(kRows);
  for (auto& b : bucket) b = g() % kBuckets;

  const std::vector<long> by_bucket = rows_by(kBuckets, [&](long r) { return bucket[r]; });

  const double pass = median_ms([&] {
    for (long r = 0; r < kRows; ++r) apply(&x[r * kDim], st.data(), st.data() + kDim);
  });
  const double grouped = median_ms([&] {
    for (long p = 0; p < kRows; ++p) {
      if (p + 4 < kRows) prefetch_row(&x[by_bucket[p + 4] * kDim]);
      apply(&x[by_bucket[p] * kDim], st.data(), st.data() + kDim);
    }
  });
  const double lookups = median_ms([&] {
    for (long r = 0; r < kRows; ++r) {
      const float* s = &table[2 * bucket[r] * kDim];
      apply(&x[r * kDim], s, s + kDim);
    }
  });
  auto ranges = [&](long passes) {
    auto range = [&](long r) { return bucket[r] * passes / kBuckets; };
    const std::vector<long> listed = rows_by(passes, range);  // the rows by range, in order
    std::vector<long> local(kRows);  // each row's bucket within its range's own table
    for (long r = 0; r < kRows; ++r) local[r] = bucket[r] - range(r) * kBuckets / passes;
    return median_ms([&] {
      for (long p = 0; p < kRows; ++p) {
        if (p + 4 < kRows) prefetch_row(&x[listed[p + 4] * kDim]);
        const long r = listed[p];
        const float* s = &table[2 * local[r] * kDim];
        apply(&x[r * kDim], s, s + kDim);
      }
    });
  };
  const double ranges4 = ranges(4), ranges8 = ranges(8);
  constexpr long kSlab = 128;
  const double slabs = median_ms([&] {
    for (long d0 = 0; d0 < kDim; d0 += kSlab) {
      for (long r = 0; r < kRows; ++r) {
        if (r + 16 < kRows) {
          for (long d = 0; d < kSlab; d += 16) __builtin_prefetch(&x[(r + 16) * kDim + d0 + d], 0, 2);
        }
        const float* s = &table[2 * bucket[r] * kSlab];
        apply(&x[r * kDim + d0], s, s + kSlab, kSlab);
      }
    }
  });
  const double tables = median_ms([&] {
    for (long k = 0; k < kBuckets; ++k) {
      const long o = k * kDim;
      scale_shift(&m1[o], &v1[o], &m2[o], &v2[o], st.data());
    }
  });
  std::vector<float> existing(kRows * kDim, 0.0f);
  const double fresh = median_ms([&] {
    std::unique_ptr<float[]> y(new float[kRows * kDim]);
    std::memcpy(y.get(), x.data(), kRows * kDim * sizeof(float));
    asm volatile("" : : "r"(y.get()) : "memory");
  });
  const double copy = median_ms([&] {
    std::memcpy(existing.data(), x.data(), kRows * kDim * sizeof(float));
    asm volatile("" : : "r"(existing.data()) : "memory");
  });
  const double floor = std::min(grouped + tables, lookups);
  std::printf("in-place pass, rows in order          %6.2f ms  1.00\n", pass);
  std::printf("rows grouped by bucket (prefetched)   %6.2f ms  %.2f\n", grouped, grouped / pass);
  std::printf("rows in order, random 40 MB table     %6.2f ms  %.2f\n", lookups, lookups / pass);
  std::printf("  in 4 bucket ranges (10 MB tables)   %6.2f ms  %.2f\n", ranges4, ranges4 / pass);
  std::printf("  in 8 bucket ranges (5 MB tables)    %6.2f ms  %.2f\n", ranges8, ranges8 / pass);
  std::printf("  in 4 slabs of 128 features          %6.2f ms  %.2f\n", slabs, slabs / pass);
  std::printf("s and t of 10,000 x 512, streamed     %6.2f ms  %.2f\n", tables, tables / pass);
  std::printf("floor of the grouped path             %6.2f ms  %.2f\n", grouped + tables, (grouped + tables) / pass);
  std::printf("copy into fresh memory (a clone)      %6.2f ms  %.2f\n", fresh, fresh / pass);
  std::printf("copy into memory already written      %6.2f ms  %.2f\n", copy, copy / pass);
  std::printf("out-of-place bound / clone            %6.2f ms  %.2f (page faults %.2f ms + the cheaper floor)\n",
              fresh - copy + floor, (fresh - copy + floor) / fresh, fresh - copy);
}
