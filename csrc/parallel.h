// Ranges of [0, n) handed to threads as they come free, for the CPU kernels' large loops.
//
// parallel_for_pieces cuts the range into about kPiecesPerThread pieces per thread (none shorter
// than `grain`), and a thread takes the next piece when it is done with its last, so a thread
// held back by another process on its core takes fewer (benchmarks/results/cpu/
// busy-core-pieces.txt).
//
// The threads are the caller and the workers of dirfast's own pool, not an OpenMP team. An
// OpenMP region (torch's parallel_for) ends at a barrier that every thread of the team must
// reach, and a worker woken on a busy core may first run at the next scheduler tick (4 ms at
// 250 Hz): the caller waited for it even when it had taken every piece itself, and two threads
// took longer than one (pairwise-busy-core.md). Here a loop is a job that workers join while it
// is open: the caller works through the pieces too, closes the job when none is left, and waits
// only for the workers inside it. A worker that wakes later finds the job closed and leaves.
//
// body(next) runs once per thread; next(begin, end) yields that thread's pieces, in ascending
// order, until it returns false (state such as buffers is set up once per thread, before the
// loop); parallel_for_ranges, for loops with no such state, calls body(begin, end) per piece. For
// work whose result does not depend on how [0, n) is split. One thread, or a range of one piece:
// body runs on the caller, its one piece [0, n). The threads are torch.get_num_threads(), the
// caller included. An exception thrown by body on any thread comes out of the call (the
// caller's first), after every thread has left the loop.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include <torch/csrc/stable/ops.h>

namespace dirfast {

constexpr int64_t kPiecesPerThread = 16;

namespace detail {

// One loop: the caller's body, which workers run too while the job is open.
struct Job {
  void (*run)(const void*) = nullptr;
  const void* body = nullptr;
  int64_t helpers = 0;  // workers that may run the body; later ones leave at once
  std::atomic<bool> closed{false};
  std::atomic<int64_t> entered{0}, left{0};  // workers that woke for the job, and that are done
  std::mutex error_mu;
  std::exception_ptr error;  // the first exception a worker's body threw
};

class Pool {
 public:
  // run(body) on the caller and on up to `helpers` workers that wake while the caller is in it;
  // returns once the caller's run is done and no worker is inside. Every access to `body` is
  // over by then: a worker runs it only if it entered before the job closed, and the caller
  // waits for those.
  void run(int64_t helpers, void (*run)(const void*), const void* body) {
    auto job = std::make_shared<Job>();
    job->run = run;
    job->body = body;
    job->helpers = helpers;
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      grow(helpers);
      current_ = job;
      generation_.fetch_add(1);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    std::exception_ptr error;
    try {
      run(body);
    } catch (...) {
      error = std::current_exception();
    }
    // Sequentially consistent with the workers' entered-then-closed: a worker either counts
    // itself in `entered` before this store, and is waited for, or sees the job closed.
    job->closed.store(true);
    while (job->left.load() != job->entered.load()) std::this_thread::yield();
    if (!error) error = job->error;  // written before its worker's `left`, read after it
    if (error) std::rethrow_exception(error);
  }

 private:
  // Workers up to `helpers` (under mu_). A thread that cannot be started leaves its share to
  // the others and to the caller.
  void grow(int64_t helpers) {
    for (; workers_ < helpers; ++workers_) {
      try {
        std::thread([this] { work(); }).detach();
      } catch (const std::system_error&) {
        return;
      }
    }
  }

  [[noreturn]] void work() {
    uint64_t seen = 0;
    for (;;) {
      // A while awake first: a step's loops come one after another, and waking a sleeping
      // thread (on a VM, an idle virtual CPU) costs more than many a loop.
      const auto awake_until = std::chrono::steady_clock::now() + kAwake;
      while (generation_.load(std::memory_order_relaxed) == seen &&
             std::chrono::steady_clock::now() < awake_until) {
        for (int i = 0; i < 16; ++i) __builtin_ia32_pause();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (generation_.load(std::memory_order_relaxed) == seen) {
          ++sleepers_;
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
          --sleepers_;
        }
        seen = generation_.load(std::memory_order_relaxed);
        job = current_;
      }
      if (job->entered.fetch_add(1) < job->helpers && !job->closed.load()) {
        try {
          job->run(job->body);
        } catch (...) {
          std::lock_guard<std::mutex> lock(job->error_mu);
          if (!job->error) job->error = std::current_exception();
        }
      }
      job->left.fetch_add(1);
    }
  }

  static constexpr std::chrono::microseconds kAwake{200};  // how long a worker looks for work before sleeping

  std::mutex mu_;  // guards current_, workers_, sleepers_ and the changes of generation_
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};  // jobs posted
  std::shared_ptr<Job> current_;         // the last job posted (closed once its caller returned)
  int64_t workers_ = 0;
  int64_t sleepers_ = 0;  // workers waiting on cv_
};

// The process's pool, made on first use and never destroyed (its workers are detached and may
// still wait on it while the process exits). A forked child (a DataLoader worker) has none of
// its parent's threads: it drops the parent's pool, without touching its locks, and makes its own.
struct PoolHome {
  std::mutex mu;
  Pool* pool = nullptr;
};

inline PoolHome& pool_home() {
  static PoolHome* home = [] {
    auto* made = new PoolHome;
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork([] { pool_home().mu.lock(); }, [] { pool_home().mu.unlock(); },
                   [] {
                     pool_home().pool = nullptr;
                     pool_home().mu.unlock();
                   });
#endif
    return made;
  }();
  return *home;
}

inline Pool& pool() {
  PoolHome& home = pool_home();
  std::lock_guard<std::mutex> lock(home.mu);
  if (home.pool == nullptr) home.pool = new Pool;
  return *home.pool;
}

}  // namespace detail

template <typename Body>
void parallel_for_pieces(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
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
  const auto participate = [&] {
    body([&](int64_t& begin, int64_t& end) {
      const int64_t p = taken.fetch_add(1, std::memory_order_relaxed);
      if (p >= pieces) return false;
      begin = p * piece;
      end = std::min(n, begin + piece);
      return true;
    });
  };
  using Participate = decltype(participate);
  detail::pool().run(std::min(threads, pieces) - 1,
                     [](const void* f) { (*static_cast<const Participate*>(f))(); }, &participate);
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
