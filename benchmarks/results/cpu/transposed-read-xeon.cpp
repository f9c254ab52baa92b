// Diagnostic harness for benchmarks/results/cpu/out-of-place-xeon.md ("The transposed tables' read,
// alone"): what reading two [B, D] = [10,000, 512] float32 tables costs, a 64-bucket block at a time
// as calibrate's BucketRows does, with their buckets contiguous (the published smoothing's layout,
// copied by 8 x 8 AVX2 transposes into a padded block) against their features contiguous (read in
// place). Also the same copy by feature blocks: 64 features of a longer run of buckets at a time, so
// each feature's read is one run of 2-8 KiB. Not part of the product. Build and run:
//   g++ -O2 -march=native -o transposed-read transposed-read-xeon.cpp && ./transposed-read
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

static const long D = 512, B = 10000, kBlock = 64, kRow = D + 16, kFeatures = 64, kFeatureRow = kFeatures + 16;

static double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((target("avx2"))) static inline void transpose8x8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Features [d0, d1) of the n buckets from `first` of a table whose buckets are `stride` floats apart
// per feature, into `block` (rows of `row` floats); the next block's lines prefetched into L2 when
// `next` is given.
__attribute__((target("avx2"))) static void fill(const float* t, long first, long n, long d0, long d1, long stride,
                                                 float* block, long row, const float* next) {
  for (long d = d0; d < d1; d += 8) {
    const float* c = t + d * stride + first;
    for (long j = 0; j < n; j += 8) {
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(c + q * stride + j);
      transpose8x8(r);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(block + (j + q) * row + d - d0, r[q]);
    }
    if (next) {
      for (int q = 0; q < 8; ++q) {
        for (long b = 0; b < n * 4; b += 64) __builtin_prefetch((const char*)(next + (d + q) * stride) + b, 0, 2);
      }
    }
  }
}

// Reads n rows of `width` floats `row` apart (what computing s and t reads of each table).
__attribute__((target("avx2"))) static float read_rows(const float* p, long n, long row, long width) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (long j = 0; j < n; ++j) {
    for (long d = 0; d < width; d += 32) {
      for (int i = 0; i < 4; ++i) s[i] = _mm256_add_ps(s[i], _mm256_loadu_ps(p + j * row + d + 8 * i));
    }
  }
  float o[8];
  _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
  return o[0];
}

int main() {
  std::vector<float> tables[2], blocks[2];
  for (auto& t : tables) t.assign(D * B, 0.5f);
  for (auto& b : blocks) b.assign(2048 * kRow, 0.0f);
  std::vector<char> evict(size_t(512) << 20);
  const char* names[] = {"features contiguous, read in place", "buckets contiguous, copied by transposes",
                         "the same copy, one block's source over and over (in L2)",
                         "feature blocks of 64, runs of 512 buckets", "feature blocks of 64, runs of 1,024 buckets",
                         "feature blocks of 64, runs of 2,048 buckets"};
  float sink = 0;
  for (int mode = 0; mode < 6; ++mode) {
    std::vector<double> ms;
    for (int rep = 0; rep < 9; ++rep) {
      std::memset(evict.data(), rep, evict.size());  // the tables start in memory, not cache
      const double t0 = now_ms();
      if (mode >= 3) {
        const long run = 512L << (mode - 3);
        for (long first = 0; first < B; first += run) {
          for (long d0 = 0; d0 < D; d0 += kFeatures) {
            for (int i = 0; i < 2; ++i) {
              const long n = std::min(run, B - first);
              fill(tables[i].data(), first, n, d0, d0 + kFeatures, B, blocks[i].data(), kFeatureRow, nullptr);
              sink += read_rows(blocks[i].data(), n, kFeatureRow, kFeatures);
            }
          }
        }
      }
      for (long first = 0; mode < 3 && first < B; first += kBlock) {
        const long n = std::min(kBlock, B - first);
        for (int i = 0; i < 2; ++i) {
          const float* t = tables[i].data();
          if (mode == 0) {
            sink += read_rows(t + first * D, n, D, D);  // the same values as [B, D], features contiguous
            continue;
          }
          const long from = mode == 1 ? first : 0;
          const float* next = mode == 1 && first + kBlock < B ? t + first + kBlock : nullptr;
          fill(t, from, n, 0, D, B, blocks[i].data(), kRow, next);
          sink += read_rows(blocks[i].data(), n, kRow, D);
        }
      }
      ms.push_back(now_ms() - t0);
    }
    std::sort(ms.begin(), ms.end());
    std::printf("%-60s median %5.2f ms (min %5.2f, max %5.2f)\n", names[mode], ms[4], ms[0], ms[8]);
  }
  return sink == 12345.0f;
}
