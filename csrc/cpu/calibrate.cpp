// dirfast::calibrate and dirfast::calibrate_ on CPU: y = x * s[b] + t[b].
//
// The per-bucket scale s and shift t (src/calibrate.h, the published zero-variance rules
// included) are computed once per bucket, for B + 1 buckets: the extra one is the identity
// (s = 1, t = -0.0, which gives back every value exactly), taken by rows whose index is outside
// [0, B). The rows layout goes two ways: while the s and t tables of all buckets would stay cached,
// they are written first and each row reads its bucket's piece; beyond that, and for a small batch,
// the rows are grouped by bucket (a counting sort) and each bucket's s and t are computed into a
// small buffer just before its rows, so no table goes through memory, each bucket's statistics are
// read once, and a thread reads no s and t that another wrote. The statistics are read in their own
// strides (BucketRows), not copied, except the met buckets' when a call meets few of many buckets
// through a transposed table (MetBuckets). A fresh output has its pages mapped before it is written
// (csrc/pages.h), and a large float32 one is written with non-temporal stores (RowWriter). The
// planar layout goes 8 channels x 8 pixels at a time from the bucket-major table (float32 where
// AVX2 runs), else a plane at a time from a feature-major one. x is read in place in both layouts
// of csrc/layout.h (others are copied once); calibrate's y has the strides of torch.empty_like(x)
// (the fake kernel's), calibrate_ writes into x (each element read before it is written, by the
// same iteration). Arithmetic in float32, or float64 when x or src_mean is float64, cast back to
// the dtype of x at the store; elementwise, so the same bits for any number of threads and either
// way through the rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

// The row loop in clones for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and the baseline: 32-byte loads
// and stores keep more lines in flight than 16-byte ones; with AVX-512, float16 rows convert in
// wider vectors, faster than in the v3 clone (benchmarks/results/cpu/grouped-rows-zen4.md, float16;
// design-constants.md). No x * s + t is fused, so every clone gives the same bits (above the
// project's headers: theirs too).
#pragma GCC optimize("fp-contract=off")

#include "calibrate.h"
#include "checks.h"
#include "layout.h"
#include "pages.h"
#include "parallel.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Whether the AVX2 code (the tables' arithmetic, the planar layout's float32 tiles) is compiled,
// to be chosen at run time where the CPU has AVX2.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__)
#define DIRFAST_CALIBRATE_AVX2 1
#else
#define DIRFAST_CALIBRATE_AVX2 0
#endif

namespace dirfast {
namespace cpu {
namespace {

// The least work a thread is given (so small work runs on one thread): elements of x to
// calibrate, or values of s and t to compute (each a divide and a square root). Small enough that
// a training batch's work is cut into several pieces, which the threads take as they come free: a
// single piece per thread waits on whichever thread runs slow, so a small batch ran slower on 2
// threads than on 1 (benchmarks/results/cpu/small-inputs-zen4.md, "Pieces, not halves").
constexpr int64_t kGrainElements = int64_t(1) << 16;
constexpr int64_t kGrainTableValues = int64_t(1) << 14;
constexpr int64_t kPlanarTile = 4096;        // pixels per task (planar layout)
// Rows are grouped by bucket when the tables would take more than this (they no longer stay in
// the last-level cache), or x has at most kSmallBatchElements and fewer rows than the tables have
// values (a training batch), and a row is at least kGroupedRowBytes long (a row read out of order
// costs little more than one read in order). A batch's s and t in a table, written by one thread
// and read by another, often made 2 threads slower than 1; grouped, no thread reads what another
// wrote, and 2 threads stay ahead (benchmarks/results/cpu/small-inputs-zen4.md, "A batch grouped
// by bucket").
constexpr int64_t kGroupedTableBytes = int64_t(16) << 20;
constexpr int64_t kSmallBatchElements = int64_t(1) << 20;
constexpr int64_t kGroupedRowBytes = 512;
// A fresh output is written with non-temporal stores when its rows are this long and the whole of
// it this large (a smaller one may still be in cache when the caller reads it).
constexpr int64_t kStreamRowBytes = 512;
constexpr int64_t kStreamOutputBytes = int64_t(16) << 20;
constexpr int64_t kAheadBytes = int64_t(8) << 10;  // rows: a row is prefetched this far before its turn
constexpr int64_t kPrefetchRowBytes = 256;          // ... when at least this long (in order; grouped: always)

#if DIRFAST_CALIBRATE_AVX2
inline bool cpu_has_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
}
#endif

// The bucket of row r: its index when in [0, B), else the identity bucket B.
template <typename index_t>
inline int64_t bucket_of(const index_t* idx, int64_t r, int64_t num_bins) {
  const int64_t k = static_cast<int64_t>(idx[r]);
  return (k >= 0 && k < num_bins) ? k : num_bins;
}

// Whether a call's rows are fewer than the values of its tables (B x D): then only the buckets
// some row meets are worth computing s and t for (a training batch against many buckets).
inline bool tables_exceed_rows(int64_t num_bins, int64_t dim, int64_t rows) {
  return num_bins * dim > rows;
}

// The buckets some of the n indices select, ascending; the identity bucket B last, when listed
// (always with `identity`).
template <typename index_t>
std::vector<int64_t> met_buckets(const index_t* idx, int64_t n, int64_t num_bins, bool identity) {
  std::vector<uint8_t> used(num_bins + 1, 0);
  for (int64_t r = 0; r < n; ++r) used[bucket_of(idx, r, num_bins)] = 1;
  used[num_bins] = identity;
  std::vector<int64_t> met;
  for (int64_t k = 0; k <= num_bins; ++k) {
    if (used[k]) met.push_back(k);
  }
  return met;
}

#if DIRFAST_CALIBRATE_AVX2
// Eight vectors of 8 floats transposed in place: r[i][j] becomes r[j][i].
__attribute__((target("avx2"))) inline void transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// BucketRows' copy of a block of a float32 table whose buckets are contiguous, 8 features x 8
// buckets at a time, into rows `row` floats apart: the whole groups of 8 of the block's n buckets
// and of the D features; returns the first feature left (the buckets left over are copied here).
__attribute__((target("avx2"))) DIRFAST_NOINLINE int64_t transpose_block_f32(const float* base, int64_t n,
                                                                           int64_t feature_stride, int64_t dim,
                                                                           int64_t row, float* block) {
  const int64_t n8 = n - n % 8;
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    const float* c = base + d * feature_stride;
    for (int64_t j = 0; j < n8; j += 8) {
      __m256 r[8];
      for (int64_t q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(c + q * feature_stride + j);
      transpose8x8(r);
      for (int64_t q = 0; q < 8; ++q) _mm256_storeu_ps(block + (j + q) * row + d, r[q]);
    }
    for (int64_t j = n8; j < n; ++j) {
      for (int64_t q = 0; q < 8; ++q) block[j * row + d + q] = c[q * feature_stride + j];
    }
  }
  return d;
}
#endif

// A [B, D] statistics table read a bucket at a time, buckets in ascending order, by one task. A
// table whose features are contiguous is read in place; any other (the published smoothing leaves
// its tables transposed, [D, B] in memory) is copied 256 bytes of buckets at a time (of the task's
// buckets only: within) into the task's buffer, four lines per feature per block, the next block's
// lines prefetched while this one is used: at many buckets a contiguous copy of the whole table
// (fresh pages, written and read again) takes longer than the op itself; blocks of 32 or 64 bytes
// take longer than these, and the next block's prefetches pay only spread over this block's buckets
// (benchmarks/results/cpu/grouped-rows-zen4.md). When the buckets are contiguous the copy goes by
// transposes: 8 x 8 for float32 where AVX2 runs (faster than 16-byte ones at many buckets:
// transposed-fill-zen4.md, design-constants.md), else 16 bytes.
// The buffer's rows are padded by a line: rows 2 KiB apart would all fall in the same few L1 sets.
template <typename acc_t>
class BucketRows {
 public:
  static constexpr int64_t kBlockBuckets = 256 / sizeof(acc_t);
  // A block starts and ends (but at B) on whole groups of the transposes' buckets: 8 floats or 4
  // doubles (a bucket left over is copied a value at a time).
  static constexpr int64_t kGroupBuckets = 32 / sizeof(acc_t);

  BucketRows(const acc_t* data, int64_t bucket_stride, int64_t feature_stride, int64_t num_bins, int64_t dim)
      : data_(data), bucket_stride_(bucket_stride), feature_stride_(feature_stride), num_bins_(num_bins),
        dim_(dim), row_(dim + 64 / sizeof(acc_t)),
        block_(feature_stride == 1 ? nullptr : new acc_t[kBlockBuckets * row_]) {}

  // The buckets [lower, limit) are this task's until the next call (a piece of the work): a block
  // is copied from no lower and up to no further, so two threads whose pieces share a block copy
  // only their own buckets of it (copying the shared blocks whole on each thread left a batch
  // against few buckets no faster on 2 threads than on 1:
  // benchmarks/results/cpu/small-inputs-zen4.md, "Each task copies its own buckets").
  void within(int64_t lower, int64_t limit) {
    lower_ = lower;
    limit_ = std::min(limit, num_bins_);
  }

  // The D values of bucket k, contiguous (k in [lower, limit) or not: then the limit is B).
  const acc_t* operator()(int64_t k) {
    if (!block_) return data_ + k * bucket_stride_;
    if (k >= limit_) limit_ = num_bins_;
    if (k < first_ || k >= end_) {
      const int64_t first = std::max(k - k % kBlockBuckets, std::min(lower_, k));
      fill(first - first % kGroupBuckets);
    }
    prefetch_next_block(k);
    return block_.get() + (k - first_) * row_;
  }

 private:
  // Buckets contiguous: the next block's lines are prefetched into L2 a slice of the features at a
  // time, each bucket k of this block taking its share, so the next fill finds them there (a fill
  // left to the hardware waited on each feature's lines in turn).
  void prefetch_next_block(int64_t k) {
    const int64_t next = end_;
    if (bucket_stride_ != 1 || next >= limit_) return;
    const int64_t bytes = std::min(kBlockBuckets, limit_ - next) * int64_t(sizeof(acc_t));
    const int64_t upto = std::min(dim_, (k - first_ + 1) * dim_ / (end_ - first_) + 1);
    for (; prefetched_ < upto; ++prefetched_) {
      const char* line = reinterpret_cast<const char*>(data_ + next + prefetched_ * feature_stride_);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(line + b, 0, 2);
    }
  }

  // The block of `first` (its 256 bytes of buckets from `first` on, up to the limit's group).
  void fill(int64_t first) {
    first_ = first;
    const int64_t limit = std::min(num_bins_, limit_ + (kGroupBuckets - limit_ % kGroupBuckets) % kGroupBuckets);
    end_ = std::min(first - first % kBlockBuckets + kBlockBuckets, limit);
    prefetched_ = 0;
    const int64_t n = end_ - first;
    const acc_t* base = data_ + first * bucket_stride_;
    acc_t* DIRFAST_RESTRICT block = block_.get();
    int64_t d = 0;
    if (bucket_stride_ == 1) {
#if DIRFAST_CALIBRATE_AVX2
      if constexpr (std::is_same_v<acc_t, float>) {
        if (cpu_has_avx2()) d = transpose_block_f32(base, n, feature_stride_, dim_, row_, block);
      }
#endif
#if defined(__SSE2__)
      d = transpose_lines(base, n, d, block);
#endif
    }
    for (; d < dim_; ++d) {
      const acc_t* column = base + d * feature_stride_;
      for (int64_t j = 0; j < n; ++j) block[j * row_ + d] = column[j * bucket_stride_];
    }
  }

#if defined(__SSE2__)
  // Buckets contiguous: the features from d on a 16-byte transpose at a time (4 x 4 floats, 2 x 2
  // doubles), the block's buckets in full vectors; returns the first feature left to the scalar loop.
  int64_t transpose_lines(const acc_t* base, int64_t n, int64_t d, acc_t* DIRFAST_RESTRICT block) const {
    constexpr int64_t L = 16 / sizeof(acc_t);
    const int64_t n_full = n - n % L;
    for (; d + L <= dim_; d += L) {
      const acc_t* c = base + d * feature_stride_;
      for (int64_t j = 0; j < n_full; j += L) {
        if constexpr (std::is_same_v<acc_t, float>) {
          __m128 r0 = _mm_loadu_ps(c + j), r1 = _mm_loadu_ps(c + feature_stride_ + j);
          __m128 r2 = _mm_loadu_ps(c + 2 * feature_stride_ + j), r3 = _mm_loadu_ps(c + 3 * feature_stride_ + j);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(block + j * row_ + d, r0);
          _mm_storeu_ps(block + (j + 1) * row_ + d, r1);
          _mm_storeu_ps(block + (j + 2) * row_ + d, r2);
          _mm_storeu_ps(block + (j + 3) * row_ + d, r3);
        } else {
          const __m128d r0 = _mm_loadu_pd(c + j), r1 = _mm_loadu_pd(c + feature_stride_ + j);
          _mm_storeu_pd(block + j * row_ + d, _mm_unpacklo_pd(r0, r1));
          _mm_storeu_pd(block + (j + 1) * row_ + d, _mm_unpackhi_pd(r0, r1));
        }
      }
      for (int64_t j = n_full; j < n; ++j) {
        for (int64_t i = 0; i < L; ++i) block[j * row_ + d + i] = c[i * feature_stride_ + j];
      }
    }
    return d;
  }
#endif

  const acc_t* data_;
  int64_t bucket_stride_, feature_stride_, num_bins_, dim_, row_;
  std::unique_ptr<acc_t[]> block_;
  int64_t lower_ = 0, limit_ = num_bins_;  // the task's buckets (within)
  int64_t first_ = 0, end_ = 0;             // the block's buckets [first_, end_) (none yet)
  int64_t prefetched_ = 0;                  // features of the next block prefetched
};

// A [B, D] statistics table in acc_t: its values and strides.
struct Table {
  const void* data;
  int64_t bucket_stride, feature_stride;
};

// The four statistics tables of a call (src_mean, src_var, dst_mean, dst_var) and their shape
// [B, D] (num_bins, dim).
struct Statistics {
  Table tables[4];
  int64_t num_bins, dim;
};

// The statistics of the buckets a call meets, when its indices are under one in 16 of the buckets
// (a training batch against a grid of buckets) and a table is read across its features (the
// published smoothing leaves its tables transposed): each table's met buckets copied into a
// contiguous [U, D] table, a line of features at a time, and the indices renumbered to them (U,
// the identity, for no bucket). Read in blocks of 64 buckets (BucketRows), a met bucket costs its
// block's lines of every feature, most of them for buckets no row uses, so a training batch against
// many buckets takes less than half the time compacted; at one index in 8 buckets compacting could
// take longer on 2 threads, hence one in 16
// (benchmarks/results/cpu/ahead-of-compile-before-after.md, seventh sitting; design-constants.md).
// The values, and each bucket's arithmetic, are those of the full tables: the same bits.
template <typename acc_t, typename index_t>
class MetBuckets {
 public:
  // Whether a call of n indices over stats is worth compacting (false: leave it as it is).
  static bool worth(const Statistics& stats, int64_t n) {
    if (n * 16 >= stats.num_bins) return false;
    for (const Table& t : stats.tables) {
      if (t.feature_stride != 1) return true;
    }
    return false;
  }

  MetBuckets(const Statistics& stats, const index_t* idx, int64_t n) {
    const int64_t num_bins = stats.num_bins, dim = stats.dim;
    const std::vector<int64_t> met = met_buckets(idx, n, num_bins, false);
    const int64_t count = static_cast<int64_t>(met.size());
    std::vector<int32_t> slot(num_bins);  // read for met buckets only
    for (int64_t j = 0; j < count; ++j) slot[met[j]] = static_cast<int32_t>(j);
    renumbered_.resize(n);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t k = bucket_of(idx, r, num_bins);
      renumbered_[r] = static_cast<index_t>(k < num_bins ? slot[k] : count);
    }
    values_.reset(new acc_t[std::max<int64_t>(4 * count * dim, 1)]);  // every value is written below
    // A task is a range of the tables' strips of a line of features (table i's strip s is
    // i S + s): each met bucket's line of the strip is read from its columns and written whole.
    constexpr int64_t kStrip = 64 / sizeof(acc_t);
    const int64_t strips = (dim + kStrip - 1) / kStrip;
    const int64_t grain = std::max<int64_t>(1, kGrainTableValues / std::max<int64_t>(count * kStrip, 1));
    parallel_for_ranges(4 * strips, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Table& from = stats.tables[c / strips];
        const int64_t d0 = (c % strips) * kStrip, width = std::min(kStrip, dim - d0);
        const acc_t* src = static_cast<const acc_t*>(from.data) + d0 * from.feature_stride;
        acc_t* DIRFAST_RESTRICT out = values_.get() + (c / strips) * count * dim + d0;
        for (int64_t j = 0; j < count; ++j) {
          const acc_t* bucket = src + met[j] * from.bucket_stride;
          for (int64_t e = 0; e < width; ++e) out[j * dim + e] = bucket[e * from.feature_stride];
        }
      }
    });
    for (int i = 0; i < 4; ++i) stats_.tables[i] = Table{values_.get() + i * count * dim, dim, 1};
    stats_.num_bins = count;
    stats_.dim = dim;
  }

  const Statistics& stats() const { return stats_; }
  const index_t* idx() const { return renumbered_.data(); }

 private:
  std::unique_ptr<acc_t[]> values_;
  std::vector<index_t> renumbered_;
  Statistics stats_{};
};

// One task's readers of the four tables.
template <typename acc_t>
class BucketStatistics {
 public:
  explicit BucketStatistics(const Statistics& stats)
      : src_mean(reader(stats, 0)), src_var(reader(stats, 1)), dst_mean(reader(stats, 2)),
        dst_var(reader(stats, 3)) {}
  BucketRows<acc_t> src_mean, src_var, dst_mean, dst_var;

  void within(int64_t lower, int64_t limit) {
    for (BucketRows<acc_t>* t : {&src_mean, &src_var, &dst_mean, &dst_var}) t->within(lower, limit);
  }

 private:
  static BucketRows<acc_t> reader(const Statistics& stats, int i) {
    const Table& t = stats.tables[i];
    return BucketRows<acc_t>(static_cast<const acc_t*>(t.data), t.bucket_stride, t.feature_stride, stats.num_bins,
                             stats.dim);
  }
};

// Vectors of kBytes of acc_t for the tables (16 bytes; 32 where AVX2 runs). g++ keeps std::sqrt a
// scalar call (errno) and does not vectorise these loops by itself (selects on comparisons that may
// trap): the square root of a vector is sqrt_lanes, one instruction where the ISA has it.
template <typename acc_t, int kBytes>
struct Vec {
  typedef acc_t v __attribute__((vector_size(kBytes), aligned(alignof(acc_t))));
  static constexpr int64_t kLanes = kBytes / sizeof(acc_t);
  static v load(const acc_t* p) {
    v r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static void store(acc_t* p, v r) { std::memcpy(p, &r, sizeof(r)); }
};

template <typename v>
inline v sqrt_lanes(v x) {
  for (int64_t i = 0; i < int64_t(sizeof(v) / sizeof(x[0])); ++i) x[i] = std::sqrt(x[i]);
  return x;
}
#if defined(__SSE2__)
inline Vec<float, 16>::v sqrt_lanes(Vec<float, 16>::v x) {
  return reinterpret_cast<Vec<float, 16>::v>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
}
inline Vec<double, 16>::v sqrt_lanes(Vec<double, 16>::v x) {
  return reinterpret_cast<Vec<double, 16>::v>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x)));
}
#endif
#if DIRFAST_CALIBRATE_AVX2
__attribute__((target("avx"))) inline Vec<float, 32>::v sqrt_lanes(Vec<float, 32>::v x) {
  return reinterpret_cast<Vec<float, 32>::v>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
}
__attribute__((target("avx"))) inline Vec<double, 32>::v sqrt_lanes(Vec<double, 32>::v x) {
  return reinterpret_cast<Vec<double, 32>::v>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(x)));
}
#endif

// s and t of one vector of dimensions: calibrate_scale_shift's arithmetic (src/calibrate.h).
template <int kBytes, typename acc_t>
inline void scale_shift_lanes(const acc_t* src_mean, const acc_t* src_var, const acc_t* dst_mean,
                              const acc_t* dst_var, acc_t lo, acc_t hi, acc_t* s, acc_t* t) {
  using V = Vec<acc_t, kBytes>;
  using v = typename V::v;
  const v one = v{} + acc_t(1), minus_zero = -v{}, var = V::load(src_var);
  const auto unchanged = var == acc_t(0);
  v ratio = V::load(dst_var) / (unchanged ? one : var);
  ratio = ratio < lo ? v{} + lo : (ratio > hi ? v{} + hi : ratio);  // clamp_nan
  const v root = sqrt_lanes(ratio);
  const v shift = V::load(dst_mean) - V::load(src_mean) * root;
  V::store(s, unchanged ? one : root);
  V::store(t, unchanged ? minus_zero : shift);
}

// One bucket's rows of the four tables, where its s and t go, and the four 16-byte partial sums of
// its src_var so far (the published bucket-wide rule).
template <typename acc_t>
struct ScaleShiftRow {
  const acc_t* src_mean;
  const acc_t* src_var;
  const acc_t* dst_mean;
  const acc_t* dst_var;
  acc_t* s;
  acc_t* t;
  typename Vec<acc_t, 16>::v part[4];
};

// s and t of the features [d, stop) of a bucket, stop - d a multiple of four 16-byte vectors, their
// src_var added to the partial sums (which do not wait on each other). kBytes is the width of the
// arithmetic (32 where AVX2 runs: the divide and the square root go through more values per unit
// of time than in 16-byte vectors on Zen 4, benchmarks/results/cpu/grouped-rows-zen4.md; the same
// bits).
template <int kBytes, typename acc_t>
inline void scale_shift_chunks(ScaleShiftRow<acc_t>& row, int64_t d, int64_t stop, acc_t lo, acc_t hi) {
  using V16 = Vec<acc_t, 16>;
  constexpr int64_t L = V16::kLanes, W = Vec<acc_t, kBytes>::kLanes;
  const acc_t* DIRFAST_RESTRICT src_mean = row.src_mean;
  const acc_t* DIRFAST_RESTRICT src_var = row.src_var;
  const acc_t* DIRFAST_RESTRICT dst_mean = row.dst_mean;
  const acc_t* DIRFAST_RESTRICT dst_var = row.dst_var;
  acc_t* DIRFAST_RESTRICT s = row.s;
  acc_t* DIRFAST_RESTRICT t = row.t;
  typename V16::v part[4] = {row.part[0], row.part[1], row.part[2], row.part[3]};
  for (; d < stop; d += 4 * L) {
    for (int64_t j = 0; j < 4; ++j) part[j] += V16::load(src_var + d + j * L);
    for (int64_t e = d; e < d + 4 * L; e += W) {
      scale_shift_lanes<kBytes, acc_t>(src_mean + e, src_var + e, dst_mean + e, dst_var + e, lo, hi, s + e, t + e);
    }
  }
  for (int64_t j = 0; j < 4; ++j) row.part[j] = part[j];
}

// scale_shift_chunks in 16-byte vectors, and in 32-byte ones compiled for AVX2 (flatten: the AVX
// sqrt_lanes is inlined through the templates between).
template <typename acc_t>
DIRFAST_NOINLINE void scale_shift_chunks_16(ScaleShiftRow<acc_t>& row, int64_t d, int64_t stop, acc_t lo, acc_t hi) {
  scale_shift_chunks<16, acc_t>(row, d, stop, lo, hi);
}
#if DIRFAST_CALIBRATE_AVX2
template <typename acc_t>
__attribute__((target("avx2"), flatten)) DIRFAST_NOINLINE void scale_shift_chunks_32(ScaleShiftRow<acc_t>& row,
                                                                                     int64_t d, int64_t stop,
                                                                                     acc_t lo, acc_t hi) {
  scale_shift_chunks<32, acc_t>(row, d, stop, lo, hi);
}
#endif

// The s and t of one bucket k in [0, B] at a time into s[0, D) and t[0, D), a slice of features at a
// time if wished: begin, advance any number of times, end. The identity (s = 1, t = -0.0) for the
// bucket B of rows outside [0, B) and for a bucket whose src_var sums below 1e-10 (the published
// rule, decided at the end). The sum's order does not depend on the slices or the width: the
// partial sums, then they, their lanes and the features left over, in order. apply_groups
// computes the next bucket a slice after each row of this one, so its divides and square roots
// run while the rows wait on memory.
template <typename acc_t>
class BucketScaleShift {
 public:
  static constexpr int64_t kChunk = 4 * Vec<acc_t, 16>::kLanes;  // features

  BucketScaleShift(const Statistics& stats, acc_t lo, acc_t hi)
      : reader_(stats), num_bins_(stats.num_bins), dim_(stats.dim), chunked_(stats.dim - stats.dim % kChunk),
        lo_(lo), hi_(hi) {}

  void begin(int64_t k, acc_t* s, acc_t* t) {
    row_.s = s;
    row_.t = t;
    identity_ = k >= num_bins_;
    done_ = 0;
    if (identity_) return;
    row_.src_mean = reader_.src_mean(k);
    row_.src_var = reader_.src_var(k);
    row_.dst_mean = reader_.dst_mean(k);
    row_.dst_var = reader_.dst_var(k);
    for (auto& p : row_.part) p = typename Vec<acc_t, 16>::v{};
  }

  // The features before `upto` (down to a whole chunk) computed.
  void advance(int64_t upto) {
    upto = std::min(upto, chunked_);
    upto -= upto % kChunk;
    if (identity_ || upto <= done_) return;
#if DIRFAST_CALIBRATE_AVX2
    if (cpu_has_avx2()) {
      scale_shift_chunks_32<acc_t>(row_, done_, upto, lo_, hi_);
    } else
#endif
      scale_shift_chunks_16<acc_t>(row_, done_, upto, lo_, hi_);
    done_ = upto;
  }

  void end() {
    advance(chunked_);
    if (!identity_) {
      const typename Vec<acc_t, 16>::v lanes = (row_.part[0] + row_.part[1]) + (row_.part[2] + row_.part[3]);
      acc_t sum = acc_t(0);
      for (int64_t i = 0; i < Vec<acc_t, 16>::kLanes; ++i) sum += lanes[i];
      for (int64_t d = chunked_; d < dim_; ++d) sum += row_.src_var[d];
      identity_ = sum < static_cast<acc_t>(kCalibrateMinVarianceSum);
    }
    if (identity_) {
      std::fill(row_.s, row_.s + dim_, acc_t(1));
      std::fill(row_.t, row_.t + dim_, -acc_t(0));
      return;
    }
    for (int64_t d = chunked_; d < dim_; ++d) {
      calibrate_scale_shift<acc_t>(row_.src_mean[d], row_.src_var[d], row_.dst_mean[d], row_.dst_var[d], lo_, hi_,
                                   row_.s[d], row_.t[d]);
    }
  }

  // The buckets [lower, limit) are the task's until the next call (BucketRows::within).
  void within(int64_t lower, int64_t limit) { reader_.within(lower, limit); }

  // Bucket k's s and t in one go.
  void whole(int64_t k, acc_t* s, acc_t* t) {
    begin(k, s, t);
    end();
  }

 private:
  BucketStatistics<acc_t> reader_;
  int64_t num_bins_, dim_, chunked_;  // chunked_: the features in whole chunks
  acc_t lo_, hi_;
  ScaleShiftRow<acc_t> row_{};
  bool identity_ = true;
  int64_t done_ = 0;  // the features computed so far
};

// The s and t of B + 1 buckets, the last the identity (s = 1, t = -0.0: x * 1 + -0.0 is x exactly,
// the sign of a zero included), taken by rows whose index is outside [0, B). Bucket-major
// (feature_major false): bucket k's s then t in st[2 k D, 2 (k + 1) D), one contiguous piece per
// row (or pixel) to read. Feature-major (the planar layout's plane loop): s[d (B + 1) + k] and t
// likewise at st + D (B + 1), a channel's values side by side. When the tables are larger than
// the index, only the buckets some row uses (and B) are computed, the others left uninitialised.
template <typename acc_t, typename index_t>
DIRFAST_NOINLINE void scale_shift_tables(const Statistics& stats, acc_t lo, acc_t hi, const index_t* idx, int64_t rows,
                                         bool feature_major, acc_t* st) {
  const int64_t num_bins = stats.num_bins, dim = stats.dim;
  std::vector<int64_t> listed;  // the buckets to compute, when not all
  if (tables_exceed_rows(num_bins, dim, rows)) listed = met_buckets(idx, rows, num_bins, true);
  const int64_t count = listed.empty() ? num_bins + 1 : static_cast<int64_t>(listed.size());
  const int64_t columns = num_bins + 1;
  const int64_t grain = std::max<int64_t>(1, kGrainTableValues / std::max<int64_t>(dim, 1));
  parallel_for_pieces(count, grain, [&](auto next) {
    std::unique_ptr<acc_t[]> buffer(feature_major ? new acc_t[2 * dim] : nullptr);
    BucketScaleShift<acc_t> bucket(stats, lo, hi);
    for (int64_t begin, end; next(begin, end);) {
      bucket.within(listed.empty() ? begin : listed[begin], listed.empty() ? end : listed[end - 1] + 1);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = listed.empty() ? i : listed[i];
        acc_t* sk = feature_major ? buffer.get() : st + 2 * k * dim;
        acc_t* tk = sk + dim;
        bucket.whole(k, sk, tk);
        if (feature_major) {
          for (int64_t d = 0; d < dim; ++d) {
            st[d * columns + k] = sk[d];
            st[(dim + d) * columns + k] = tk[d];
          }
        }
      }
    }
  });
}

// One row: y = x * s + t along the D features, in place (y only) or from x into another row
// (restrict parameters: the loops vectorise).
template <typename T, typename acc_t>
__attribute__((always_inline))
inline void apply_row_body(T* DIRFAST_RESTRICT y, const acc_t* DIRFAST_RESTRICT s, const acc_t* DIRFAST_RESTRICT t,
                           int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    y[d] = from_acc<T>(calibrate_apply<acc_t>(to_acc<acc_t>(y[d]), s[d], t[d]));
  }
}

template <typename T, typename acc_t>
__attribute__((always_inline))
inline void apply_row_body(const T* DIRFAST_RESTRICT x, T* DIRFAST_RESTRICT y, const acc_t* DIRFAST_RESTRICT s,
                           const acc_t* DIRFAST_RESTRICT t, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    y[d] = from_acc<T>(calibrate_apply<acc_t>(to_acc<acc_t>(x[d]), s[d], t[d]));
  }
}

// apply_row_body in the clones, one overload per (x dtype, accumulation dtype) pair and way (the
// clones' ifunc is made per function, as in the other kernels, not per template).
#define DIRFAST_CALIBRATE_APPLY_ROW(T, acc_t)                                                                 \
  DIRFAST_V4_CLONES DIRFAST_NOINLINE void apply_row(T* y, const acc_t* s, const acc_t* t, int64_t dim) { \
    apply_row_body<T, acc_t>(y, s, t, dim);                                                                \
  }                                                                                                        \
  DIRFAST_V4_CLONES DIRFAST_NOINLINE void apply_row(const T* x, T* y, const acc_t* s, const acc_t* t,       \
                                                    int64_t dim) {                                          \
    apply_row_body<T, acc_t>(x, y, s, t, dim);                                                             \
  }
DIRFAST_CALIBRATE_APPLY_ROW(float, float)
DIRFAST_CALIBRATE_APPLY_ROW(float, double)
DIRFAST_CALIBRATE_APPLY_ROW(double, float)
DIRFAST_CALIBRATE_APPLY_ROW(double, double)
DIRFAST_CALIBRATE_APPLY_ROW(c10::Half, float)
DIRFAST_CALIBRATE_APPLY_ROW(c10::Half, double)
DIRFAST_CALIBRATE_APPLY_ROW(c10::BFloat16, float)
DIRFAST_CALIBRATE_APPLY_ROW(c10::BFloat16, double)
#undef DIRFAST_CALIBRATE_APPLY_ROW

// One channel plane of a tile: y[i] = x[i] * s[bucket[i]] + t[bucket[i]].
template <typename T, typename acc_t>
inline void apply_plane(T* DIRFAST_RESTRICT y, const T* DIRFAST_RESTRICT x, const acc_t* DIRFAST_RESTRICT s,
                        const acc_t* DIRFAST_RESTRICT t, const int32_t* DIRFAST_RESTRICT bucket, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const int32_t k = bucket[i];
    y[i] = from_acc<T>(calibrate_apply<acc_t>(to_acc<acc_t>(x[i]), s[k], t[k]));
  }
}

// One float32 row from x into a fresh output: the whole 64-byte lines of y written with
// non-temporal stores (not read for ownership first, nor left in cache), the partial lines at
// either end with plain ones. x * s + t as calibrate_apply (a multiply, then an add): the same bits.
#if DIRFAST_CALIBRATE_AVX2
__attribute__((target("avx2"))) DIRFAST_NOINLINE void stream_row_f32(const float* x, float* y, const float* s,
                                                                        const float* t, int64_t dim) {
  const uintptr_t misplaced = reinterpret_cast<uintptr_t>(y) & 63;
  const int64_t head =
      misplaced % sizeof(float) ? dim : std::min<int64_t>(dim, ((64 - misplaced) & 63) / sizeof(float));
  int64_t d = 0;
  for (; d < head; ++d) y[d] = calibrate_apply<float>(x[d], s[d], t[d]);
  auto lanes = [&](int64_t i) {
    return _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(s + i)), _mm256_loadu_ps(t + i));
  };
  for (; d + 16 <= dim; d += 16) {
    _mm256_stream_ps(y + d, lanes(d));
    _mm256_stream_ps(y + d + 8, lanes(d + 8));
  }
  for (; d < dim; ++d) y[d] = calibrate_apply<float>(x[d], s[d], t[d]);
}
#endif

// How the rows of x go into the rows of y: in place (x is y: calibrate_), from x into a fresh
// output (calibrate), or, for a large float32 output where AVX2 runs (kStreamOutputBytes), streamed
// into it: a fresh output's lines need not be read before they are written, and streaming each row
// from x is faster than copying x first and calibrating in place
// (benchmarks/results/cpu/out-of-place-zen4.md). A thread that streamed calls done() before its
// work is over (the stores are weakly ordered).
template <typename T, typename acc_t>
struct RowWriter {
  const T* x;
  int64_t x_stride;
  T* y;
  int64_t y_stride, dim;
  bool stream;

  RowWriter(const T* x_, int64_t x_stride_, T* y_, int64_t y_stride_, int64_t rows, int64_t dim_)
      : x(x_), x_stride(x_stride_), y(y_), y_stride(y_stride_), dim(dim_), stream(false) {
#if DIRFAST_CALIBRATE_AVX2
    const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
    stream = std::is_same_v<T, float> && std::is_same_v<acc_t, float> && x != y && row_bytes >= kStreamRowBytes &&
             rows * row_bytes >= kStreamOutputBytes && cpu_has_avx2();
#else
    (void)rows;
#endif
  }

  // Row r: y[r] = x[r] * s + t.
  void operator()(int64_t r, const acc_t* s, const acc_t* t) const {
#if DIRFAST_CALIBRATE_AVX2
    if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
      if (stream) return stream_row_f32(x + r * x_stride, y + r * y_stride, s, t, dim);
    }
#endif
    if (x == y) return apply_row(y + r * y_stride, s, t, dim);
    apply_row(x + r * x_stride, y + r * y_stride, s, t, dim);
  }

  void done() const {
#if DIRFAST_CALIBRATE_AVX2
    if (stream) _mm_sfence();
#endif
  }
};

// Rows layout with tables: each row reads its bucket's piece. A row of at least kPrefetchRowBytes
// is prefetched into L2 kAheadBytes of rows before its turn: left to the hardware, the rows wait on
// memory, while shorter rows run slower with the prefetch
// (benchmarks/results/cpu/row-prefetch-zen4.md). The rows are written too, yet these (and
// apply_groups') are read prefetches: built for a baseline with PRFCHW (-march=native), a write
// prefetch is prefetchw, which fills L1 on Zen 4 and makes calibrate_ at many buckets much slower
// (benchmarks/results/cpu/native-baseline-zen4.md).
template <typename T, typename acc_t, typename index_t>
DIRFAST_NOINLINE void apply_rows(const RowWriter<T, acc_t>& write, const index_t* idx, int64_t rows,
                                 int64_t num_bins, const acc_t* st) {
  const int64_t dim = write.dim;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(dim, 1));
  const int64_t row_bytes = std::max<int64_t>(dim, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = row_bytes >= kPrefetchRowBytes ? std::max<int64_t>(1, kAheadBytes / row_bytes) : rows;
  parallel_for_ranges(rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r + ahead < end) {
        const T* later = write.x + (r + ahead) * write.x_stride;
        for (int64_t d = 0; d < dim; d += 64 / sizeof(T)) __builtin_prefetch(later + d, 0, 2);
      }
      const acc_t* sk = st + 2 * bucket_of(idx, r, num_bins) * dim;
      write(r, sk, sk + dim);
    }
    write.done();
  });
}

// The rows listed bucket by bucket (a stable counting sort): bucket k's rows are
// order[first[k], first[k + 1]), the identity bucket B's last.
template <typename index_t>
DIRFAST_NOINLINE void group_rows(const index_t* idx, int64_t rows, int64_t num_bins,
                                 std::vector<int64_t>& order, std::vector<int64_t>& first) {
  first.assign(num_bins + 2, 0);
  for (int64_t r = 0; r < rows; ++r) ++first[bucket_of(idx, r, num_bins) + 1];
  for (int64_t k = 0; k <= num_bins; ++k) first[k + 1] += first[k];
  order.resize(rows);
  list_rows_by_bucket(rows, first.data(), num_bins + 1, [&](int64_t r) { return bucket_of(idx, r, num_bins); },
                      order.data());
}

// Rows layout grouped by bucket: a thread takes pieces of the grouped rows and computes the s and t
// of each bucket it meets into a buffer of its own (a bucket two pieces share is computed for
// both, alike), the next bucket's a slice after each row of this one (BucketScaleShift): computed
// in one go before its rows, s and t hold up the rows' memory traffic, and sliced before each row
// they slow a streamed output's rows (benchmarks/results/cpu/grouped-rows-zen4.md). The rows come
// out of order: each is prefetched into L2 kAheadBytes of rows before its turn (non-temporal
// prefetches into L1 two rows before are much slower on Zen 4: same file).
template <typename T, typename acc_t>
DIRFAST_NOINLINE void apply_groups(const RowWriter<T, acc_t>& write, const int64_t* order, const int64_t* first,
                                   int64_t rows, const Statistics& stats, acc_t lo, acc_t hi) {
  const int64_t num_bins = stats.num_bins, dim = stats.dim;
  // A row may come with its bucket's s and t to compute: the tables' grain.
  const int64_t grain = std::max<int64_t>(1, kGrainTableValues / std::max<int64_t>(dim, 1));
  const int64_t ahead = std::max<int64_t>(1, kAheadBytes / (dim * int64_t(sizeof(T))));
  parallel_for_pieces(rows, grain, [&](auto next) {
    std::unique_ptr<acc_t[]> buffer(new acc_t[4 * dim]);
    BucketScaleShift<acc_t> bucket(stats, lo, hi);
    acc_t* now = buffer.get();        // this bucket's s, then t
    acc_t* coming = now + 2 * dim;    // the next one's
    for (int64_t begin, end; next(begin, end);) {
      int64_t k = std::upper_bound(first, first + num_bins + 2, begin) - first - 1;  // has row `begin`
      bucket.within(k, std::upper_bound(first, first + num_bins + 2, end - 1) - first);  // up to row end - 1's
      bucket.whole(k, now, now + dim);
      for (int64_t p = begin; p < end;) {
        const int64_t stop = std::min(end, first[k + 1]), count = stop - p;
        int64_t following = k + 1;  // the next bucket with rows, computed alongside if in this piece
        while (following <= num_bins && first[following + 1] == first[following]) ++following;
        const bool overlap = following <= num_bins && first[following] < end;
        if (overlap) bucket.begin(following, coming, coming + dim);
        for (int64_t i = 1; p < stop; ++p, ++i) {
          const int64_t r = order[p];
          if (p + ahead < end) {
            const T* later = write.x + order[p + ahead] * write.x_stride;
            for (int64_t d = 0; d < dim; d += 64 / sizeof(T)) __builtin_prefetch(later + d, 0, 2);
          }
          write(r, now, now + dim);
          if (overlap) bucket.advance(i * dim / count);
        }
        if (!overlap) break;  // p == end
        bucket.end();
        std::swap(now, coming);
        k = following;
      }
    }
    write.done();
  });
}

// Whether the planar layout of (T, acc_t) goes 8 channels x 8 pixels at a time (apply_tile_f32)
// from the bucket-major table, rather than a plane at a time from the feature-major one: float32
// on a CPU with AVX2.
template <typename T, typename acc_t>
bool planar_blocks() {
#if DIRFAST_CALIBRATE_AVX2
  return std::is_same_v<T, float> && std::is_same_v<acc_t, float> && cpu_has_avx2();
#else
  return false;
#endif
}

// One float32 tile of the planar layout, 8 channels x 8 pixels at a time: each pixel's s (and t)
// of 8 channels is one 32-byte load from its bucket's row of the bucket-major table, transposed to
// 8 channels of 8 pixels (a plane at a time, every value is a gather, far slower:
// benchmarks/results/cpu/design-constants.md).
// The channels and pixels left over go one value at a time. x * s + t as calibrate_apply (a
// multiply, then an add): the same bits.
#if DIRFAST_CALIBRATE_AVX2
__attribute__((target("avx2"))) DIRFAST_NOINLINE void apply_tile_f32(float* y, int64_t y_stride, const float* x,
                                                                        int64_t x_stride, const float* st,
                                                                        const int32_t* bucket, int64_t len,
                                                                        int64_t dim) {
  const int64_t len8 = len - len % 8;
  const int64_t dim8 = dim - dim % 8;
  for (int64_t c = 0; c < dim8; c += 8) {
    const float* xc = x + c * x_stride;
    float* yc = y + c * y_stride;
    for (int64_t i = 0; i < len8; i += 8) {
      __m256 sv[8], tv[8];
      for (int j = 0; j < 8; ++j) {
        const float* r = st + 2 * bucket[i + j] * dim + c;
        sv[j] = _mm256_loadu_ps(r);
        tv[j] = _mm256_loadu_ps(r + dim);
      }
      transpose8x8(sv);
      transpose8x8(tv);
      for (int q = 0; q < 8; ++q) {
        _mm256_storeu_ps(yc + q * y_stride + i,
                         _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xc + q * x_stride + i), sv[q]), tv[q]));
      }
    }
    for (int64_t i = len8; i < len; ++i) {
      const float* r = st + 2 * bucket[i] * dim + c;
      for (int64_t q = 0; q < 8; ++q) yc[q * y_stride + i] = calibrate_apply<float>(xc[q * x_stride + i], r[q], r[dim + q]);
    }
  }
  for (int64_t c = dim8; c < dim; ++c) {
    for (int64_t i = 0; i < len; ++i) {
      const float* r = st + 2 * bucket[i] * dim + c;
      y[c * y_stride + i] = calibrate_apply<float>(x[c * x_stride + i], r[0], r[dim]);
    }
  }
}
#endif

// Planar layout: a task is a tile of pixels of one batch item; their buckets are resolved once,
// then the tile goes by apply_tile_f32 (st bucket-major), or each channel plane of the tile is
// streamed with s and t gathered from the channel's row (st feature-major).
template <typename T, typename acc_t, typename index_t>
DIRFAST_NOINLINE void apply_planes(const T* x, const Layout& lx, T* y, const Layout& ly,
                                   const index_t* idx, int64_t num_bins, const acc_t* st, bool feature_major) {
  const int64_t inner = lx.inner;
  const int64_t dim = lx.dim;
  const int64_t columns = num_bins + 1;
  const acc_t* t = st + dim * columns;
  const int64_t tile = std::min(kPlanarTile, inner);
  const int64_t tiles = (inner + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(tile * dim, 1));
  parallel_for_pieces(lx.batch * tiles, grain, [&](auto next) {
    std::unique_ptr<int32_t[]> bucket(new int32_t[tile]);
    for (int64_t begin, end; next(begin, end);) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles;
        const int64_t s0 = (task - b * tiles) * tile;
        const int64_t len = std::min<int64_t>(tile, inner - s0);
        for (int64_t i = 0; i < len; ++i) {
          bucket[i] = static_cast<int32_t>(bucket_of(idx, b * inner + s0 + i, num_bins));
        }
        const T* xb = x + b * lx.batch_stride + s0;
        T* yb = y + b * ly.batch_stride + s0;
#if DIRFAST_CALIBRATE_AVX2
        if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
          if (!feature_major) {
            apply_tile_f32(yb, ly.feature_stride, xb, lx.feature_stride, st, bucket.get(), len, dim);
            continue;
          }
        }
#endif
        for (int64_t c = 0; c < dim; ++c) {
          apply_plane<T, acc_t>(yb + c * ly.feature_stride, xb + c * lx.feature_stride, st + c * columns,
                                t + c * columns, bucket.get(), len);
        }
      }
    }
  });
}

// Checks the arguments, then calibrates x into y: a fresh tensor shaped like x (calibrate) or x
// itself (calibrate_).
void calibrate_into(const char* op, const Tensor& x, Tensor y, const Tensor& bin_idx,
                    const Tensor& src_mean, const Tensor& src_var, const Tensor& dst_mean,
                    const Tensor& dst_var, double clip_min, double clip_max) {
  check_calibrate_args(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, op,
                       torch::headeronly::DeviceType::CPU);
  if (x.get() == y.get()) check_writable_in_place(x, op);
  const ScalarType acc = acc_type({x.scalar_type(), src_mean.scalar_type()});
  // In acc's dtype, in their own strides (BucketRows).
  const Tensor m1 = in_dtype(src_mean, acc), v1 = in_dtype(src_var, acc);
  const Tensor m2 = in_dtype(dst_mean, acc), v2 = in_dtype(dst_var, acc);
  if (x.numel() == 0) return;
  const InOut plan = plan_in_out(x, y);
  if (plan.out.get() != x.get()) populate_output(plan.out);  // a fresh output: calibrate, or odd strides
  const Tensor idx = made_contiguous(bin_idx);
  const int64_t dim = plan.lx.dim;
  const bool planar = plan.lx.kind == Layout::kPlanar;

  dispatch_float(x.scalar_type(), op, [&](auto scalar) {
    using T = decltype(scalar);
    dispatch_acc(acc, [&](auto acc_scalar) {
      using acc_t = decltype(acc_scalar);
      dispatch_index(idx.scalar_type(), [&](auto index) {
        using index_t = decltype(index);
        const index_t* pi = idx.const_data_ptr<index_t>();
        const acc_t lo = static_cast<acc_t>(clip_min), hi = static_cast<acc_t>(clip_max);
        auto table = [](const Tensor& t) { return Table{t.const_data_ptr<acc_t>(), t.stride(0), t.stride(1)}; };
        Statistics stats{{table(m1), table(v1), table(m2), table(v2)}, src_mean.size(0), dim};
        std::unique_ptr<MetBuckets<acc_t, index_t>> met;
        if (MetBuckets<acc_t, index_t>::worth(stats, idx.numel())) {
          met = std::make_unique<MetBuckets<acc_t, index_t>>(stats, pi, idx.numel());
          stats = met->stats();
          pi = met->idx();
        }
        const int64_t num_bins = stats.num_bins;
        const int64_t entries = std::max<int64_t>(2 * (num_bins + 1) * dim, 1);
        const T* px = plan.x.const_data_ptr<T>();
        T* py = plan.out.mutable_data_ptr<T>();
        const int64_t rows = plan.lx.rows;
        const RowWriter<T, acc_t> write(px, plan.lx.row_stride, py, plan.ly.row_stride, rows, dim);  // rows layout
        const bool batch = rows * dim <= kSmallBatchElements && tables_exceed_rows(num_bins, dim, rows);
        const bool grouped = !planar && (entries * static_cast<int64_t>(sizeof(acc_t)) > kGroupedTableBytes || batch) &&
                             dim * static_cast<int64_t>(sizeof(T)) >= kGroupedRowBytes;
        if (grouped) {
          std::vector<int64_t> order, first;
          group_rows<index_t>(pi, rows, num_bins, order, first);
          apply_groups<T, acc_t>(write, order.data(), first.data(), rows, stats, lo, hi);
          return;
        }
        std::unique_ptr<acc_t[]> st(new acc_t[entries]);  // left uninitialised: see scale_shift_tables
        const bool feature_major = planar && !planar_blocks<T, acc_t>();
        scale_shift_tables<acc_t, index_t>(stats, lo, hi, pi, rows, feature_major, st.get());
        if (planar) {
          apply_planes<T, acc_t, index_t>(px, plan.lx, py, plan.ly, pi, num_bins, st.get(), feature_major);
        } else {
          apply_rows<T, acc_t, index_t>(write, pi, rows, num_bins, st.get());
        }
      });
    });
  });
  if (plan.out.get() != y.get()) torch::stable::copy_(y, plan.out);
}

Tensor calibrate_cpu(const Tensor& x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                     const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  Tensor y = torch::stable::empty_like(x);  // the fake kernel's strides
  calibrate_into("dirfast::calibrate", x, y, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
  return y;
}

void calibrate_inplace_cpu(Tensor x, const Tensor& bin_idx, const Tensor& src_mean, const Tensor& src_var,
                           const Tensor& dst_mean, const Tensor& dst_var, double clip_min, double clip_max) {
  calibrate_into("dirfast::calibrate_", x, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max);
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("calibrate", TORCH_BOX(&dirfast::cpu::calibrate_cpu));
  m.impl("calibrate_", TORCH_BOX(&dirfast::cpu::calibrate_inplace_cpu));
}
