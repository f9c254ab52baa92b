// dirfast::bin_stats on CPU: per-bucket count, mean and unbiased variance in one pass over x.
//
// Every bucket's rows take Welford's update in row order, in pieces cut at points fixed by the
// shapes and bin_idx, never by the thread count, and the pieces are merged with Chan's formula
// in a fixed order: the same bits for 1 thread or 64, run after run. The updates are plain, and
// where the result says a bucket's mean is over 20 standard deviations from zero (the plain
// updates' error may pass 2e-6 of the variance there: src/welford.h, welford_far) that bucket is
// done again with shifted updates (each row's difference from the plain mean, in the features
// that are far: src/welford.h, welford_shift), which keep a float32 variance accurate however far
// the bucket is: such data takes about twice the time, the rest none
// (benchmarks/results/cpu/far-from-zero-xeon.md). Every bucket's result depends on its own rows
// only, and the choice on the data, never the threads.
//   Long rows ([N, D] or channels-last, rows of 256 bytes or more): a bucket's rows are cut by
//     rank into segments of at most `seg` rows, so that one large bucket still splits over
//     threads; a task takes a range of segments, bucket by bucket. One task alone scans x in
//     order when all segments' accumulators fit in cache; otherwise each task gathers its
//     segments' rows through the row numbers sorted by bucket, a segment's accumulators staying
//     in L1. Both ways give the same bits.
//   Short rows, and the planar layout ([B, C, *spatial], read in transposed tiles): the rows are
//     cut into chunks, each reduced in order by one task into its own dense table of buckets,
//     and the tables merged in chunk order.
// x is read in place in both layouts of csrc/layout.h (other layouts are made contiguous first);
// accumulation is in float32 for float16 / bfloat16 / float32 x and float64 for float64 x, every
// offset int64.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

// x86-64-v3 (AVX2 + FMA) or the baseline for the row loops, and x86-64-v4 (AVX-512) for the two
// that read rows in order (scatter_rows, scan_rows: faster with it on Zen 4, where reduce_list's
// gathered rows gained nothing: benchmarks/results/cpu/avx512-clones.md); no a * b + c is fused,
// so every clone gives the same bits (above the project's headers: their functions too, whatever
// the baseline).
#pragma GCC optimize("fp-contract=off")

#include "bucket_rows.h"
#include "checks.h"
#include "layout.h"
#include "pages.h"
#include "parallel.h"
#include "welford.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kMaxChunks = 16;                      // chunks of rows, at most
constexpr int64_t kMinChunkElements = 1 << 15;          // elements a chunk gets, at least
constexpr int64_t kPartialShare = 4;                    // chunk tables: at most x's bytes / this
constexpr int64_t kMinPartialBytes = int64_t(1) << 20;  // ... or this much
constexpr int64_t kTileBytes = int64_t(256) << 10;      // transposed tile buffer (planar)
constexpr int64_t kScanTableBytes = int64_t(6) << 20;   // largest scanned table (rows)
constexpr int64_t kScanAheadBytes = int64_t(32) << 10;  // ... a row is prefetched this far before its turn
constexpr int64_t kMinFinishElements = 1 << 17;         // ... of the final pass over buckets

// Bytes of one dense table: count, mean and M2 of every bucket.
int64_t table_bytes(int64_t num_bins, int64_t dim, int64_t acc_bytes) {
  return num_bins * (2 * dim * acc_bytes + 8);
}

// Chunks of rows (chunked way): at most kMaxChunks of at least kMinChunkElements elements each,
// fewer while the tables of chunks 1.. (chunk 0 writes into the outputs) would take more than
// max(kMinPartialBytes, x's bytes in acc_t / kPartialShare).
int64_t chunk_count(int64_t rows, int64_t dim, int64_t num_bins, int64_t acc_bytes) {
  const int64_t d = std::max<int64_t>(dim, 1);
  int64_t k = std::min<int64_t>(kMaxChunks, std::max<int64_t>(1, rows * d / kMinChunkElements));
  k = std::max<int64_t>(1, std::min<int64_t>(k, rows));
  const int64_t budget = std::max<int64_t>(kMinPartialBytes, rows * d * acc_bytes / kPartialShare);
  const int64_t table = table_bytes(num_bins, dim, acc_bytes);
  while (k > 1 && (k - 1) * table > budget) --k;
  return k;
}

// ------------------------------------------------------------------------------ row loops
// Welford's update of a dense table (count, mean, M2: `dim` accumulators per bucket) with the n
// rows of x (`stride` apart: the transposed tiles of the planar layout) whose buckets are
// idx[0 .. n): plain updates (shift null), or shifted by the buckets' rows of the table `shift`
// for the buckets `only` marks; rows of no bucket, or of a bucket `only` leaves out, are skipped.
template <typename acc_t, typename in_t, typename index_t, typename shift_t>
__attribute__((always_inline))
inline void scatter_rows_body(const in_t* x, int64_t stride, int64_t dim, const index_t* idx,
                              int64_t n, int64_t num_bins, const shift_t* shift, const uint8_t* only,
                              int64_t* count, acc_t* mean, acc_t* m2) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t k = static_cast<int64_t>(idx[r]);
    if (k < 0 || k >= num_bins) continue;  // selects no bucket
    if (only != nullptr && !only[k]) continue;
    const in_t* row = x + r * stride;
    const int64_t c = ++count[k];
    const shift_t* shift_k = shift_row<shift_t>(shift, k * dim);
    if (c == 1) {
      welford_row_init<acc_t, in_t, shift_t>(mean + k * dim, m2 + k * dim, row, shift_k, dim);
    } else {
      welford_row_add<acc_t, in_t, shift_t>(mean + k * dim, m2 + k * dim, row, shift_k, dim,
                                            acc_t(1) / static_cast<acc_t>(c));
    }
  }
}

// A bucket as a scan meets its rows: how many it met so far, and its first segment.
struct Cursor {
  int64_t rank;
  int64_t first;
};

// The rows of segments [s0, s1), found by reading all `rows` rows of x in order: a row of
// bucket k (k_lo <= k < k_lo + cursors) is the i-th of its bucket, i = cursor[k - k_lo].rank,
// so it belongs to segment first + i / seg, of which it is the (i % seg + 1)-th row. Each
// segment's rows take Welford's update in row order, into table + s * 2 * dim (D means, D M2s).
// Each row is prefetched into L2 kScanAheadBytes of rows before its turn: left to the hardware,
// the scan waits on memory (benchmarks/results/cpu/row-prefetch-zen4.md).
template <typename acc_t, typename in_t, typename index_t>
__attribute__((always_inline))
inline void scan_rows_body(const in_t* x, int64_t stride, int64_t dim, const index_t* idx,
                           int64_t rows, int64_t k_lo, int64_t cursors, Cursor* cursor,
                           int64_t s0, int64_t s1, int64_t seg, acc_t* table) {
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(in_t));
  const int64_t ahead = std::max<int64_t>(1, kScanAheadBytes / std::max<int64_t>(row_bytes, 1));
  for (int64_t r = 0; r < rows; ++r) {
    if (r + ahead < rows) {
      const char* later = reinterpret_cast<const char*>(x + (r + ahead) * stride);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(later + b, 0, 2);
    }
    const uint64_t j = static_cast<uint64_t>(static_cast<int64_t>(idx[r]) - k_lo);
    if (j >= static_cast<uint64_t>(cursors)) continue;  // another task's bucket, or no bucket
    Cursor& c = cursor[j];
    const int64_t i = c.rank++;
    const int64_t s = c.first + (i < seg ? 0 : i / seg);
    if (s < s0 || s >= s1) continue;  // another task's segment of the bucket
    const int64_t n = (i < seg ? i : i % seg) + 1;
    const in_t* row = x + r * stride;
    acc_t* mean = table + s * 2 * dim;
    if (n == 1) {
      welford_row_init<acc_t, in_t, NoShift>(mean, mean + dim, row, nullptr, dim);
    } else {
      welford_row_add<acc_t, in_t, NoShift>(mean, mean + dim, row, nullptr, dim, acc_t(1) / static_cast<acc_t>(n));
    }
  }
}

// M2 and mean of n >= 1 rows turned into what the bucket reports, in place: the variance (0 for
// one row, welford_reported_variance otherwise), and the mean made NaN where it is not finite (a
// non-finite feature: welford_reported_mean, in the same pass). Returns whether plain updates
// may have lost the accuracy of a feature's variance (welford_far; welford_row_shift decides the
// same from M2).
template <typename acc_t>
__attribute__((always_inline))
inline bool variance_row_body(acc_t* DIRFAST_RESTRICT m2, acc_t* DIRFAST_RESTRICT mean, int64_t dim, int64_t n) {
  if (n <= 1) {
    std::fill(m2, m2 + dim, acc_t(0));
    for (int64_t d = 0; d < dim; ++d) mean[d] = welford_reported_mean<acc_t>(mean[d]);
    return false;
  }
  const acc_t denominator = static_cast<acc_t>(n - 1);
  int far = 0;  // an int and `&`, not a bool and `&&`: the loop vectorises
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t v = welford_reported_variance<acc_t>(m2[d], mean[d], denominator);
    m2[d] = v;
    far |= welford_far<acc_t>(mean[d], v);
    mean[d] = welford_reported_mean<acc_t>(mean[d]);
  }
  return far != 0;
}

// The compiled loops: one overload per (input, accumulator, index) type, each with its clones.
#define DIRFAST_SCATTER_ROWS(in_t, acc_t, index_t)                                              \
  DIRFAST_V4_CLONES DIRFAST_NOINLINE void scatter_rows(                                         \
      const in_t* x, int64_t stride, int64_t dim, const index_t* idx, int64_t n,                \
      int64_t num_bins, const acc_t* shift, const uint8_t* only, int64_t* count, acc_t* mean,   \
      acc_t* m2) {                                                                              \
    if (shift == nullptr) {                                                                     \
      scatter_rows_body<acc_t, in_t, index_t, NoShift>(x, stride, dim, idx, n, num_bins,        \
                                                       nullptr, only, count, mean, m2);         \
    } else {                                                                                    \
      scatter_rows_body<acc_t, in_t, index_t, acc_t>(x, stride, dim, idx, n, num_bins, shift,   \
                                                     only, count, mean, m2);                    \
    }                                                                                           \
  }
#define DIRFAST_SCAN_ROWS(in_t, acc_t, index_t)                                                \
  DIRFAST_V4_CLONES DIRFAST_NOINLINE void scan_rows(                                           \
      const in_t* x, int64_t stride, int64_t dim, const index_t* idx, int64_t rows,            \
      int64_t k_lo, int64_t cursors, Cursor* cursor, int64_t s0, int64_t s1, int64_t seg,      \
      acc_t* table) {                                                                          \
    scan_rows_body<acc_t, in_t, index_t>(x, stride, dim, idx, rows, k_lo, cursors, cursor, s0, \
                                         s1, seg, table);                                      \
  }
#define DIRFAST_ROW_LOOPS(in_t, acc_t)       \
  DIRFAST_SCATTER_ROWS(in_t, acc_t, int64_t) \
  DIRFAST_SCATTER_ROWS(in_t, acc_t, int32_t) \
  DIRFAST_SCAN_ROWS(in_t, acc_t, int64_t)    \
  DIRFAST_SCAN_ROWS(in_t, acc_t, int32_t)    \
  DIRFAST_REDUCE_LIST(in_t, acc_t)
DIRFAST_ROW_LOOPS(float, float)
DIRFAST_ROW_LOOPS(double, double)
DIRFAST_ROW_LOOPS(c10::Half, float)
DIRFAST_ROW_LOOPS(c10::BFloat16, float)
DIRFAST_UNSHIFT_ROW(float)
DIRFAST_UNSHIFT_ROW(double)
DIRFAST_V3_CLONES DIRFAST_NOINLINE bool variance_row(float* m2, float* mean, int64_t dim, int64_t n) {
  return variance_row_body(m2, mean, dim, n);
}
DIRFAST_V3_CLONES DIRFAST_NOINLINE bool variance_row(double* m2, double* mean, int64_t dim, int64_t n) {
  return variance_row_body(m2, mean, dim, n);
}
#undef DIRFAST_ROW_LOOPS
#undef DIRFAST_SCAN_ROWS
#undef DIRFAST_SCATTER_ROWS

// ------------------------------------------------------------------------------ the kernel
template <typename scalar_t, typename index_t>
class BinStats {
  using acc_t = opmath_t<scalar_t>;

 public:
  BinStats(const Tensor& x, const Layout& layout, const index_t* idx, int64_t num_bins)
      : x_(x.const_data_ptr<scalar_t>()), layout_(layout), idx_(idx), num_bins_(num_bins),
        dim_(layout.dim) {}

  DIRFAST_NOINLINE void run(int64_t* count_out, acc_t* mean_out, acc_t* var_out) {
    const int64_t row_bytes = dim_ * static_cast<int64_t>(sizeof(scalar_t));
    if (layout_.kind == Layout::kRows && row_bytes >= kLongRowBytes) {
      run_rows(count_out, mean_out, var_out);
    } else {
      const std::vector<uint8_t> far = run_chunked(count_out, mean_out, var_out, nullptr);
      if (std::find(far.begin(), far.end(), uint8_t(1)) != far.end()) {
        run_chunked(count_out, mean_out, var_out, far.data());  // those buckets again, shifted
      }
    }
  }

 private:
  // ---------------------------------------------------------------------------- chunked
  // The pass with plain updates (redo null), or with shifted ones for the buckets `redo` marks
  // (the other buckets' rows skipped, their results kept). Returns the buckets whose plain updates
  // may have lost accuracy (welford_far).
  DIRFAST_NOINLINE std::vector<uint8_t> run_chunked(int64_t* count_out, acc_t* mean_out, acc_t* var_out,
                                                    const uint8_t* redo) {
    const int64_t rows = layout_.rows;
    const int64_t dim = dim_;
    const int64_t bins = num_bins_;
    const int64_t chunks = chunk_count(rows, dim, bins, sizeof(acc_t));
    const std::unique_ptr<acc_t[]> shift = redo ? far_shifts(redo, mean_out, var_out) : nullptr;
    std::vector<uint8_t> far(bins, 0);  // each written by one task
    // Chunk c's table: counts[c], and mean / M2 in the outputs (c = 0) or in `extra` (written
    // only where the chunk has rows: untouched pages cost no memory).
    std::unique_ptr<int64_t[]> counts(new int64_t[chunks * bins]());
    std::unique_ptr<acc_t[]> extra(new acc_t[std::max<int64_t>((chunks - 1) * bins * 2 * dim, 1)]);
    auto mean_of = [&](int64_t c) {
      return c == 0 ? mean_out : extra.get() + (c - 1) * bins * 2 * dim;
    };
    auto m2_of = [&](int64_t c) { return c == 0 ? var_out : mean_of(c) + bins * dim; };
    parallel_for_ranges(chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        reduce_chunk(rows * c / chunks, rows * (c + 1) / chunks, shift.get(), redo, counts.get() + c * bins,
                     mean_of(c), m2_of(c));
      }
    });
    const int64_t grain = std::max<int64_t>(1, kMinFinishElements / (std::max<int64_t>(dim, 1) * chunks));
    parallel_for_ranges(bins, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (redo != nullptr && !redo[k]) continue;
        acc_t* mean = mean_out + k * dim;
        acc_t* m2 = var_out + k * dim;  // holds M2 until the end
        int64_t n = 0;
        // Chunk order, fixed: the result does not depend on the threads.
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t nb = counts[c * bins + k];
          if (nb == 0) continue;
          const acc_t* mean_b = mean_of(c) + k * dim;
          const acc_t* m2_b = m2_of(c) + k * dim;
          if (n == 0) {
            if (c != 0) {
              std::copy(mean_b, mean_b + dim, mean);
              std::copy(m2_b, m2_b + dim, m2);
            }
          } else {
            chan_merge_row<acc_t>(mean, m2, mean_b, m2_b, dim, chan_weights<acc_t>(n, nb));
          }
          n += nb;
        }
        count_out[k] = n;
        far[k] = finish(k, n, redo ? shift.get() + k * dim : nullptr, mean, m2, mean_out, var_out);
      }
    });
    if (redo != nullptr) std::fill(far.begin(), far.end(), uint8_t(0));
    return far;
  }

  // The shifts of the buckets `far` marks (welford_shift of their plain updates' mean and variance,
  // at mean_out and var_out), as a table of [num_bins, dim] acc_t whose other rows are left unset.
  std::unique_ptr<acc_t[]> far_shifts(const uint8_t* far, const acc_t* mean_out, const acc_t* var_out) const {
    const int64_t dim = dim_;
    std::unique_ptr<acc_t[]> shift(new acc_t[std::max<int64_t>(num_bins_ * dim, 1)]);
    for (int64_t k = 0; k < num_bins_; ++k) {
      if (!far[k]) continue;
      for (int64_t d = k * dim; d < (k + 1) * dim; ++d) shift[d] = welford_shift<acc_t>(mean_out[d], var_out[d]);
    }
    return shift;
  }

  // buf[i * dim + c] = src[c * stride + i] for the len pixels of a tile: each channel plane is
  // read contiguously, four planes at a time (four values per pixel written together).
  static void transpose_tile(acc_t* DIRFAST_RESTRICT buf, const scalar_t* DIRFAST_RESTRICT src,
                             int64_t stride, int64_t dim, int64_t len) {
    int64_t c = 0;
    for (; c + 4 <= dim; c += 4) {
      const scalar_t* s0 = src + c * stride;
      const scalar_t* s1 = s0 + stride;
      const scalar_t* s2 = s1 + stride;
      const scalar_t* s3 = s2 + stride;
      acc_t* dst = buf + c;
      for (int64_t i = 0; i < len; ++i) {
        dst[i * dim] = to_acc<acc_t>(s0[i]);
        dst[i * dim + 1] = to_acc<acc_t>(s1[i]);
        dst[i * dim + 2] = to_acc<acc_t>(s2[i]);
        dst[i * dim + 3] = to_acc<acc_t>(s3[i]);
      }
    }
    for (; c < dim; ++c) {
      const scalar_t* s0 = src + c * stride;
      acc_t* dst = buf + c;
      for (int64_t i = 0; i < len; ++i) dst[i * dim] = to_acc<acc_t>(s0[i]);
    }
  }

  // Rows [row_begin, row_end) into one chunk's table. Rows layout: each row read where it is.
  // Planar layout: a tile of pixels is read channel plane by channel plane (four planes at a
  // time), contiguously along the spatial axis, and transposed into a small buffer ([tile, C],
  // 256 KiB: L2-resident), whose rows then take the same update.
  DIRFAST_NOINLINE void reduce_chunk(int64_t row_begin, int64_t row_end, const acc_t* shift,
                                     const uint8_t* only, int64_t* count, acc_t* mean, acc_t* m2) {
    const int64_t dim = dim_;
    if (layout_.kind == Layout::kRows) {
      const int64_t stride = layout_.row_stride;
      scatter_rows(x_ + row_begin * stride, stride, dim, idx_ + row_begin, row_end - row_begin,
                   num_bins_, shift, only, count, mean, m2);
      return;
    }
    const int64_t inner = layout_.inner;
    const int64_t tile = std::max<int64_t>(
        16, std::min<int64_t>(4096, kTileBytes / (std::max<int64_t>(dim, 1) * sizeof(acc_t))));
    std::unique_ptr<acc_t[]> buffer(new acc_t[tile * std::max<int64_t>(dim, 1)]);
    acc_t* buf = buffer.get();
    int64_t r = row_begin;
    while (r < row_end) {
      const int64_t b = r / inner;
      const int64_t s = r - b * inner;
      const int64_t len = std::min<int64_t>({tile, inner - s, row_end - r});
      transpose_tile(buf, x_ + b * layout_.batch_stride + s, layout_.feature_stride, dim, len);
      scatter_rows(static_cast<const acc_t*>(buf), dim, dim, idx_ + r, len, num_bins_, shift, only, count,
                   mean, m2);
      r += len;
    }
  }

  // ---------------------------------------------------------------------------- rows
  DIRFAST_NOINLINE void run_rows(int64_t* count_out, acc_t* mean_out, acc_t* var_out) {
    const int64_t rows = layout_.rows;
    const int64_t dim = dim_;
    const int64_t bins = num_bins_;
    std::fill(count_out, count_out + bins, int64_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t k = static_cast<int64_t>(idx_[r]);
      if (k >= 0 && k < bins) ++count_out[k];
    }
    // Bucket k's rows, in row order, take positions [start[k], start[k + 1]) of the sorted order
    // and are cut every `seg` rows into segments (segs.group[s] is the bucket of segment s).
    std::vector<int64_t> start(bins + 1);
    start[0] = 0;
    for (int64_t k = 0; k < bins; ++k) start[k + 1] = start[k] + count_out[k];
    const int64_t valid = start[bins];
    const int64_t seg = segment_rows(rows, dim);
    const Segments segs(start.data(), bins, seg);
    const int64_t segments = segs.count();

    // Each task takes the segments that start in its range of sorted positions, and finds their
    // rows in one of two ways that give the same bits (so the choice may follow the threads):
    // one task alone scans x in order when all segments' accumulators fit in cache; otherwise
    // each task gathers its rows through the row numbers sorted by bucket (stable).
    const int64_t stride = 2 * std::max<int64_t>(dim, 1);
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(dim, 1));
    const int64_t tasks = std::min<int64_t>(kernel_threads(), (valid + grain - 1) / grain);
    const bool gather = tasks > 1 || segments * stride * static_cast<int64_t>(sizeof(acc_t)) > kScanTableBytes;
    // Scanned: every segment's mean and M2 side by side in `table`. Gathered: a bucket's first
    // segment accumulates into its rows of the outputs, later ones into `table`.
    auto in_outputs = [&](int64_t s) { return gather && s == segs.first[segs.group[s]]; };
    int64_t stored = 0;
    for (int64_t s = 0; s < segments; ++s) stored += !in_outputs(s);
    std::unique_ptr<acc_t[]> table(new acc_t[std::max<int64_t>(stored * stride, 1)]);
    std::vector<acc_t*> seg_mean(segments), seg_m2(segments);
    for (int64_t s = 0, slot = 0; s < segments; ++s) {
      const int64_t k = segs.group[s];
      seg_mean[s] = in_outputs(s) ? mean_out + k * dim : table.get() + stride * slot++;
      seg_m2[s] = in_outputs(s) ? var_out + k * dim : seg_mean[s] + dim;
    }
    std::unique_ptr<int64_t[]> order;
    auto list_rows = [&] {
      order.reset(new int64_t[std::max<int64_t>(valid, 1)]);
      list_rows_by_bucket(rows, start.data(), bins, [&](int64_t r) {
        const int64_t k = static_cast<int64_t>(idx_[r]);
        return k >= 0 && k < bins ? k : int64_t(-1);
      }, order.get());
    };
    if (gather) list_rows();
    std::vector<uint8_t> far(bins, 0);  // buckets to redo shifted (each written by one task)

    parallel_for_ranges(valid, gather ? grain : valid, [&](int64_t begin, int64_t end) {  // scanned: one task
      const auto [s0, s1] = segs.starting_in(begin, end);
      if (s0 == s1) return;  // no segment starts in this piece
      // A bucket of one segment is done as soon as its rows are (gathered: its accumulators still
      // in cache; after the task's whole range they had left it).
      auto finish_whole = [&](int64_t s) {
        const int64_t k = segs.group[s];
        if (!segs.whole(s)) return;
        far[k] = finish(k, count_out[k], nullptr, seg_mean[s], seg_m2[s], mean_out, var_out);
      };
      if (gather) {
        for (int64_t s = s0; s < s1; ++s) {
          reduce_list(x_, layout_.row_stride, dim, order.get() + segs.start[s], segs.rows(s), order.get() + valid,
                      s == s0, nullptr, seg_mean[s], seg_m2[s]);
          finish_whole(s);
        }
      } else {
        const int64_t k_lo = segs.group[s0];
        const int64_t cursors = segs.group[s1 - 1] - k_lo + 1;
        std::unique_ptr<Cursor[]> cursor(new Cursor[cursors]);
        for (int64_t j = 0; j < cursors; ++j) cursor[j] = Cursor{0, segs.first[k_lo + j]};
        scan_rows(x_, layout_.row_stride, dim, idx_, rows, k_lo, cursors, cursor.get(), s0, s1,
                  seg, table.get());
        for (int64_t s = s0; s < s1; ++s) finish_whole(s);
      }
    });

    // Empty buckets, and the segments of the others merged in order (fixed: the result does not
    // depend on the threads).
    const int64_t finish_grain = std::max<int64_t>(1, kMinFinishElements / std::max<int64_t>(dim, 1));
    parallel_for_ranges(bins, finish_grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t s0 = segs.first[k];
        const int64_t s1 = segs.first[k + 1];
        if (s1 - s0 == 1) continue;
        acc_t* mean = mean_out + k * dim;
        acc_t* m2 = var_out + k * dim;
        if (s1 > s0 && seg_mean[s0] != mean) {
          std::copy(seg_mean[s0], seg_mean[s0] + dim, mean);
          std::copy(seg_m2[s0], seg_m2[s0] + dim, m2);
        }
        int64_t n = std::min<int64_t>(count_out[k], seg);
        for (int64_t s = s0 + 1; s < s1; ++s) {
          const int64_t nb = segs.rows(s);
          chan_merge_row<acc_t>(mean, m2, seg_mean[s], seg_m2[s], dim, chan_weights<acc_t>(n, nb));
          n += nb;
        }
        far[k] = finish(k, n, nullptr, mean, m2, mean_out, var_out);
      }
    });

    // Buckets far from zero, again with shifted updates (far_shifts, taken before the plain results
    // are overwritten): their segments (in parallel: one large bucket still splits over threads)
    // into the same places as above, then merged in order.
    std::vector<int64_t> redo, redo_segments;
    for (int64_t k = 0; k < bins; ++k) {
      if (!far[k]) continue;
      redo.push_back(k);
      for (int64_t s = segs.first[k]; s < segs.first[k + 1]; ++s) redo_segments.push_back(s);
    }
    if (redo.empty()) return;
    if (!order) list_rows();
    const std::unique_ptr<acc_t[]> shift = far_shifts(far.data(), mean_out, var_out);
    auto shift_of = [&](int64_t k) -> const acc_t* { return shift.get() + k * dim; };
    parallel_for_ranges(static_cast<int64_t>(redo_segments.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = redo_segments[i];
        reduce_list(x_, layout_.row_stride, dim, order.get() + segs.start[s], segs.rows(s), order.get() + valid,
                    i == begin, shift_of(segs.group[s]), seg_mean[s], seg_m2[s]);
      }
    });
    parallel_for_ranges(static_cast<int64_t>(redo.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = redo[i];
        const int64_t s0 = segs.first[k], s1 = segs.first[k + 1];
        acc_t* mean = mean_out + k * dim;
        acc_t* m2 = var_out + k * dim;
        if (seg_mean[s0] != mean) {
          std::copy(seg_mean[s0], seg_mean[s0] + dim, mean);
          std::copy(seg_m2[s0], seg_m2[s0] + dim, m2);
        }
        int64_t n = segs.rows(s0);
        for (int64_t s = s0 + 1; s < s1; ++s) {
          const int64_t nb = segs.rows(s);
          chan_merge_row<acc_t>(mean, m2, seg_mean[s], seg_m2[s], dim, chan_weights<acc_t>(n, nb));
          n += nb;
        }
        finish(k, n, shift_of(k), mean, m2, mean_out, var_out);
      }
    });
  }

  // Bucket k of n rows, whose running mean (shifted updates by `shift`, or plain ones where it is
  // null) and M2 are at mean and m2: its mean and unbiased variance in the outputs (both 0 when the
  // bucket is empty). Returns whether plain updates would lose accuracy there (variance_row).
  bool finish(int64_t k, int64_t n, const acc_t* shift, const acc_t* mean, const acc_t* m2,
              acc_t* mean_out, acc_t* var_out) const {
    acc_t* mean_k = mean_out + k * dim_;
    acc_t* var_k = var_out + k * dim_;
    if (n == 0) {
      std::fill(mean_k, mean_k + dim_, acc_t(0));
      std::fill(var_k, var_k + dim_, acc_t(0));
      return false;
    }
    if (mean != mean_k) std::copy(mean, mean + dim_, mean_k);
    if (m2 != var_k) std::copy(m2, m2 + dim_, var_k);
    if (shift != nullptr) unshift_row(mean_k, shift, dim_);  // plain: variance_row's pass makes a NaN
    return variance_row(var_k, mean_k, dim_, n);
  }

  const scalar_t* x_;
  Layout layout_;
  const index_t* idx_;
  int64_t num_bins_;
  int64_t dim_;
};

std::tuple<Tensor, Tensor, Tensor> bin_stats_cpu(const Tensor& x, const Tensor& bin_idx,
                                                 int64_t num_bins, bool deterministic) {
  (void)deterministic;  // the CPU kernel is deterministic either way
  const char* op = "dirfast::bin_stats";
  check_features_and_bins(x, bin_idx, op, torch::headeronly::DeviceType::CPU);
  const ScalarType acc = acc_type({x.scalar_type()});
  const std::tuple<Tensor, Tensor, Tensor> outputs = bin_stats_outputs(x, num_bins, acc, op);
  Tensor count = std::get<0>(outputs), mean = std::get<1>(outputs), var = std::get<2>(outputs);
  // Tables of many buckets are fresh memory where glibc maps them anew (csrc/pages.h).
  populate_output(mean);
  populate_output(var);

  const Tensor xr = readable(x);  // a copy only for layouts the kernel does not walk
  const Layout layout = classify(xr);
  const Tensor idx = made_contiguous(bin_idx);
  dispatch_float(x.scalar_type(), op, [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = opmath_t<scalar_t>;
    dispatch_index(idx.scalar_type(), [&](auto index) {
      using index_t = decltype(index);
      BinStats<scalar_t, index_t>(xr, layout, idx.const_data_ptr<index_t>(), num_bins)
          .run(count.mutable_data_ptr<int64_t>(), mean.mutable_data_ptr<acc_t>(),
               var.mutable_data_ptr<acc_t>());
    });
  });
  return std::make_tuple(count, mean, var);
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("bin_stats", TORCH_BOX(&dirfast::cpu::bin_stats_cpu));
}
