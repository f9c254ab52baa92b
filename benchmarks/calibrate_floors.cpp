// Memory floors of calibrate_ at many buckets (issue 21): what the C++ kernel's two ways through
// 65,536 x 512 float32 rows with 10,000 buckets cost on this machine before any arithmetic.
//
//   g++ -O3 -march=native -fno-math-errno -ffp-contract=off benchmarks/calibrate_floors.cpp -o /tmp/floors && /tmp/floors
//
// Prints medians of 11 single-threaded runs of: an in-place pass in row order (the yardstick,
// as x.mul_(1)); the same rows visited in a random order (the grouped path's order: rows grouped
// by bucket are scattered over x), the next rows prefetched non-temporally as the kernel does;
// rows in order each reading its bucket's s and t from a 40 MB table at random (the table
// path); the s and t of every bucket streamed from four [B, D] statistics tables (divide,
// clamp, square root); and a copy of x into fresh memory (what x.clone() does: the pages are
// faulted in as they are written) and into memory already written. A kernel that faults its
// output's pages one at a time and writes it with plain stores pays the clone's page faults (fresh
// minus already written) plus at least the cheaper of the two floors above (it also reads its
// output's lines for ownership), so the last line bounds out-of-place calibrate / clone for such a
// kernel. The kernel no longer is one: it maps a fresh output's pages in one call (csrc/pages.h)
// and streams large float32 rows past the cache, below this bound
// (benchmarks/results/cpu/out-of-place-zen4.md).
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

void apply(float* __restrict__ row, const float* __restrict__ s, const float* __restrict__ t) {
  for (long d = 0; d < kDim; ++d) row[d] = row[d] * s[d] + t[d];
}
}  // namespace

int main() {
  std::vector<float> x(kRows * kDim, 1.5f), table(2 * kBuckets * kDim, 1.0f), st(2 * kDim, 1.0f);
  std::vector<float> m1(kBuckets * kDim, 0.5f), v1(kBuckets * kDim, 1.5f), m2(kBuckets * kDim, 0.3f),
      v2(kBuckets * kDim, 2.0f);
  std::fill(st.begin() + kDim, st.end(), 0.0f);
  std::vector<long> order(kRows);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 g(1);
  std::shuffle(order.begin(), order.end(), g);
  std::vector<long> bucket(kRows);
  for (auto& b : bucket) b = g() % kBuckets;

  const double pass = median_ms([&] {
    for (long r = 0; r < kRows; ++r) apply(&x[r * kDim], st.data(), st.data() + kDim);
  });
  const double shuffled = median_ms([&] {
    for (long p = 0; p < kRows; ++p) {
      if (p + 2 < kRows) {
        for (long d = 0; d < kDim; d += 16) __builtin_prefetch(&x[order[p + 2] * kDim + d], 1, 0);
      }
      apply(&x[order[p] * kDim], st.data(), st.data() + kDim);
    }
  });
  const double lookups = median_ms([&] {
    for (long r = 0; r < kRows; ++r) {
      const float* s = &table[2 * bucket[r] * kDim];
      apply(&x[r * kDim], s, s + kDim);
    }
  });
  const double tables = median_ms([&] {
    for (long k = 0; k < kBuckets; ++k) {
      const long o = k * kDim;
      for (long d = 0; d < kDim; ++d) {
        const float root = std::sqrt(std::min(std::max(v2[o + d] / v1[o + d], 0.1f), 10.0f));
        st[d] = root;
        st[kDim + d] = m2[o + d] - m1[o + d] * root;
      }
      asm volatile("" : : "r"(st.data()) : "memory");
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
  const double floor = std::min(shuffled + tables, lookups);
  std::printf("in-place pass, rows in order        %6.2f ms  1.00\n", pass);
  std::printf("rows in random order (prefetched)   %6.2f ms  %.2f\n", shuffled, shuffled / pass);
  std::printf("rows in order, random 40 MB table   %6.2f ms  %.2f\n", lookups, lookups / pass);
  std::printf("s and t of 10,000 x 512, streamed   %6.2f ms  %.2f\n", tables, tables / pass);
  std::printf("floor of the grouped path           %6.2f ms  %.2f\n", shuffled + tables, (shuffled + tables) / pass);
  std::printf("copy into fresh memory (a clone)    %6.2f ms  %.2f\n", fresh, fresh / pass);
  std::printf("copy into memory already written    %6.2f ms  %.2f\n", copy, copy / pass);
  std::printf("out-of-place bound / clone          %6.2f ms  %.2f (page faults %.2f ms + the cheaper floor)\n",
              fresh - copy + floor, (fresh - copy + floor) / fresh, fresh - copy);
}
