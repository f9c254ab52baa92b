// Ranges of [0, n) handed to threads as they come free, for the CPU kernels' large loops.
//
// torch's parallel_for gives each thread one equal share up front, so a call lasts as long as its
// slowest thread: where another process holds one of the cores, the thread on it runs at part
// speed, and two threads took longer than one (benchmarks/results/cpu/busy-core-pieces.txt).
// parallel_for_pieces cuts the range into about kPiecesPerThread pieces per thread (none shorter
// than `grain`), and a thread takes the next piece when it is done with its last, so a thread
// held back takes fewer.
//
// body(next) runs once per thread; next(begin, end) yields that thread's pieces, in ascending
// order, until it returns false (state such as buffers is set up once per thread, before the
// loop); parallel_for_ranges, for loops with no such state, calls body(begin, end) per piece. For
// work whose result does not depend on how [0, n) is split. One thread, or a range of one piece:
// body runs on the caller, its one piece [0, n).
//
// The threads are kernel_threads(): torch's, but no more than the cores other processes leave
// free (csrc/cpu/kernel_threads.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <torch/csrc/stable/ops.h>

namespace dirfast {

constexpr int64_t kPiecesPerThread = 16;

// The threads a CPU kernel runs on: torch.get_num_threads(), and while free_cores_only is on (the
// default) no more than the cores of this process's CPUs that other processes leave free.
int64_t kernel_threads();
// Turns that limit on or off for the whole process; returns the previous setting.
bool set_free_cores_only(bool on);

template <typename Body>
void parallel_for_pieces(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, kernel_threads());
  const int64_t piece = std::max<int64_t>({grain, int64_t(1), (n + threads * kPiecesPerThread - 1) / (threads * kPiecesPerThread)});
  const int64_t pieces = (n + piece - 1) / piece;
  if (threads == 1 || pieces == 1) {
    bool given = false;
    body([&](int64_t& begin, int64_t& end) {
      if (given) return false;
      given = true;
      begin = 0;
      end = n;
      return true;
    });
    return;
  }
  std::atomic<int64_t> taken{0};
  torch::stable::parallel_for(0, std::min(threads, pieces), 1, [&](int64_t, int64_t) {
    body([&](int64_t& begin, int64_t& end) {
      const int64_t p = taken.fetch_add(1, std::memory_order_relaxed);
      if (p >= pieces) return false;
      begin = p * piece;
      end = std::min(n, begin + piece);
      return true;
    });
  });
}

// parallel_for_pieces for a loop with no per-thread state: body(begin, end) for each piece, torch's
// parallel_for's contract.
template <typename Body>
void parallel_for_ranges(int64_t n, int64_t grain, const Body& body) {
  parallel_for_pieces(n, grain, [&](auto next) {
    for (int64_t begin, end; next(begin, end);) body(begin, end);
  });
}

}  // namespace dirfast
