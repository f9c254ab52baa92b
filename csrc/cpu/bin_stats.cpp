// dirfast::bin_stats on CPU: per-bucket count, mean and unbiased variance in one pass over x.
//
// The rows are cut into chunks whose number depends on the shapes only, never on the thread
// count; each chunk is reduced by one thread with Welford's update into its own sparse partial
// per bucket, and the partials are merged with Chan's formula in chunk order. Every
// floating-point operation therefore happens in the same order whatever the number of threads:
// the same bits for 1 thread or 64, run after run. x is read in place in both layouts of
// csrc/layout.h (other layouts are made contiguous first); accumulation is in float32 for
// float16 / bfloat16 / float32 x and float64 for float64 x, every offset int64.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "checks.h"
#include "layout.h"
#include "welford.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr int64_t kMaxChunks = 16;                 // chunks of rows, at most
constexpr int64_t kMinChunkElements = 1 << 15;     // elements a chunk gets, at least
constexpr int64_t kMinBudgetBytes = int64_t(64) << 20;  // partials may take this much, at least
constexpr int64_t kTileBytes = int64_t(256) << 10;  // transposed tile buffer (planar layout)

// One chunk's partial statistics, sparse over buckets: a slot is given to a bucket the first time
// the chunk meets it (slot_of: one int32 per bucket), and the slots are one allocation written
// only as far as it is used (untouched pages cost no memory).
template <typename acc_t>
struct Partial {
  std::vector<int32_t> slot_of;      // bucket -> slot, -1 when the chunk has no row of it
  std::unique_ptr<int64_t[]> count;  // per slot
  std::unique_ptr<acc_t[]> data;     // per slot: D means, then D M2s
  int64_t used = 0;

  acc_t* mean(int64_t slot, int64_t dim) { return data.get() + slot * 2 * dim; }
  acc_t* m2(int64_t slot, int64_t dim) { return data.get() + slot * 2 * dim + dim; }
};

// K, the number of chunks: at most kMaxChunks, fewer for small inputs, and lowered until the
// partials' bound fits in max(64 MiB, the size of the mean and var outputs). A chunk holds at most
// min(B, rows of the chunk) slots of 2 * D accumulators, so the partials take at most
// K * min(B, ceil(rows / K)) * 2 * D * sizeof(acc) + K * B * 4 bytes: a few MiB for the usual
// DIR bucket counts (B <= a few hundred).
int64_t chunk_count(int64_t rows, int64_t dim, int64_t num_bins, int64_t acc_bytes) {
  const int64_t d = std::max<int64_t>(dim, 1);
  int64_t k = std::min<int64_t>(kMaxChunks, std::max<int64_t>(1, rows * d / kMinChunkElements));
  k = std::max<int64_t>(1, std::min<int64_t>(k, rows));
  const int64_t budget = std::max<int64_t>(kMinBudgetBytes, 2 * num_bins * dim * acc_bytes);
  auto bytes = [&](int64_t chunks) {
    const int64_t slots = std::min<int64_t>(num_bins, (rows + chunks - 1) / chunks);
    return chunks * (slots * (2 * dim * acc_bytes + 8) + num_bins * 4);
  };
  while (k > 1 && bytes(k) > budget) --k;
  return k;
}

template <typename scalar_t, typename index_t>
class BinStats {
  using acc_t = opmath_t<scalar_t>;

 public:
  BinStats(const Tensor& x, const Layout& layout, const index_t* idx, int64_t num_bins)
      : x_(x.const_data_ptr<scalar_t>()), layout_(layout), idx_(idx), num_bins_(num_bins),
        dim_(layout.dim) {}

  DIRFAST_NOINLINE void run(int64_t* count_out, acc_t* mean_out, acc_t* var_out) {
    const int64_t rows = layout_.rows;
    const int64_t chunks = chunk_count(rows, dim_, num_bins_, sizeof(acc_t));
    std::vector<Partial<acc_t>> parts(chunks);
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        reduce_chunk(parts[c], rows * c / chunks, rows * (c + 1) / chunks);
      }
    });
    const int64_t dim = dim_;
    const int64_t grain = std::max<int64_t>(1, 4096 / (std::max<int64_t>(dim, 1) * chunks));
    torch::stable::parallel_for(0, num_bins_, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t* mean = mean_out + k * dim;
        acc_t* m2 = var_out + k * dim;  // holds M2 until the end
        int64_t n = 0;
        // Chunk order, fixed: the result does not depend on the threads.
        for (int64_t c = 0; c < chunks; ++c) {
          Partial<acc_t>& part = parts[c];
          const int32_t slot = part.slot_of[k];
          if (slot < 0) continue;
          const int64_t nb = part.count[slot];
          if (n == 0) {
            std::copy(part.mean(slot, dim), part.mean(slot, dim) + dim, mean);
            std::copy(part.m2(slot, dim), part.m2(slot, dim) + dim, m2);
          } else {
            chan_merge_row<acc_t>(mean, m2, part.mean(slot, dim), part.m2(slot, dim), dim,
                                  chan_weights<acc_t>(n, nb));
          }
          n += nb;
        }
        count_out[k] = n;
        if (n == 0) {
          std::fill(mean, mean + dim, acc_t(0));
          std::fill(m2, m2 + dim, acc_t(0));
        } else {
          for (int64_t d = 0; d < dim; ++d) m2[d] = welford_variance<acc_t>(n, m2[d]);
        }
      }
    });
  }

 private:
  // Welford update of `part` with row r, whose values are at `values` (in scalar_t or acc_t).
  template <typename in_t>
  inline void add_row(Partial<acc_t>& part, int64_t r, const in_t* values) {
    const int64_t k = static_cast<int64_t>(idx_[r]);
    if (k < 0 || k >= num_bins_) return;  // selects no bucket
    int32_t& slot = part.slot_of[k];
    if (slot < 0) {
      slot = static_cast<int32_t>(part.used++);
      part.count[slot] = 1;
      welford_row_init<acc_t, in_t>(part.mean(slot, dim_), part.m2(slot, dim_), values, dim_);
    } else {
      const int64_t n = ++part.count[slot];
      welford_row_add<acc_t, in_t>(part.mean(slot, dim_), part.m2(slot, dim_), values, dim_,
                                   acc_t(1) / static_cast<acc_t>(n));
    }
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
        dst[i * dim] = static_cast<acc_t>(s0[i]);
        dst[i * dim + 1] = static_cast<acc_t>(s1[i]);
        dst[i * dim + 2] = static_cast<acc_t>(s2[i]);
        dst[i * dim + 3] = static_cast<acc_t>(s3[i]);
      }
    }
    for (; c < dim; ++c) {
      const scalar_t* s0 = src + c * stride;
      acc_t* dst = buf + c;
      for (int64_t i = 0; i < len; ++i) dst[i * dim] = static_cast<acc_t>(s0[i]);
    }
  }

  // Rows layout ([N, D], channels-last): each row is read where it is. Planar layout (contiguous
  // [B, C, *spatial]): a tile of pixels is read channel plane by channel plane (four planes at a
  // time), contiguously along the spatial axis, and transposed into a small per-chunk buffer
  // ([tile, C], 256 KiB: L2-resident), whose rows then take the same Welford update.
  DIRFAST_NOINLINE void reduce_chunk(Partial<acc_t>& part, int64_t row_begin, int64_t row_end) {
    const int64_t capacity =
        std::max<int64_t>(1, std::min<int64_t>(num_bins_, row_end - row_begin));
    part.slot_of.assign(num_bins_, -1);
    part.count.reset(new int64_t[capacity]);
    part.data.reset(new acc_t[capacity * 2 * std::max<int64_t>(dim_, 1)]);  // not initialised
    if (layout_.kind == Layout::kRows) {
      const int64_t stride = layout_.row_stride;
      for (int64_t r = row_begin; r < row_end; ++r) add_row(part, r, x_ + r * stride);
      return;
    }
    // Planar: tiles of pixels within one batch item, transposed to [tile, D] rows.
    const int64_t dim = dim_;
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
      for (int64_t i = 0; i < len; ++i) add_row(part, r + i, buf + i * dim);
      r += len;
    }
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
  STD_TORCH_CHECK(num_bins >= 1 && num_bins < (int64_t(1) << 31) - 1, op,
                  ": num_bins must be in [1, 2^31 - 2], got ", num_bins);
  const ScalarType acc = acc_type({x.scalar_type()});
  const int64_t dim = x.size(1);
  Tensor count = empty({num_bins}, ScalarType::Long, x);
  Tensor mean = empty({num_bins, dim}, acc, x);
  Tensor var = empty({num_bins, dim}, acc, x);

  const Tensor xr = readable(x);  // a copy only for layouts the kernel does not walk
  const Layout layout = classify(xr);
  const Tensor idx = torch::stable::contiguous(bin_idx);
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
