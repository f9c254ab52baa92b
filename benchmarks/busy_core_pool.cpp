// Two threads on a machine whose other core is busy (issue 21): an OpenMP region, as torch's
// parallel_for runs dirfast's CPU loops, against a pool whose caller waits only for the pieces
// in flight, not for a worker that has not started.
//
//   g++ -O2 -fopenmp -pthread benchmarks/busy_core_pool.cpp -o /tmp/pool && /tmp/pool 2
//   (and again with `python -c "while True: pass" &` on the other core)
//
// A step is ten times: about 1 ms of serial work, then about 4 ms (on one core) split into 32
// pieces taken from a counter, the shape of a RankSim or ConR call. Prints the median step of 40
// for each way. An OpenMP region ends at a barrier every thread of the team must reach: a worker
// woken on a busy core may run only at the next scheduler tick (4 ms at this VM's 250 Hz), and the
// caller waits for it even when it has done all the pieces itself. In the pool, each region is a
// Job of its own (shared with the workers that wake for it): a worker that comes late finds it
// closed and leaves without touching its body, and one that wakes for an old job never joins a
// newer one, so the caller waits only for workers that entered while the job was open.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

double sink = 0;
void work(long iters) {
  double a = 1.0;
  for (long i = 0; i < iters; ++i) a = a * 1.0000001 + 1e-9;
  sink += a;
}

struct Job {
  const std::function<void()>* body;
  std::atomic<bool> closed{false};
  std::atomic<int> entered{0}, left{0};
};

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { loop(); }).detach();
  }

  // body() on the caller and on every worker that wakes while the job is open; returns once the
  // caller's body() is done and no worker is inside the job.
  void run(const std::function<void()>& body) {
    auto job = std::make_shared<Job>();
    job->body = &body;
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = job;
      ++generation_;
    }
    cv_.notify_all();
    body();
    job->closed.store(true);  // seq_cst with the workers' entered/closed pair
    while (job->left.load() != job->entered.load()) std::this_thread::yield();
  }

 private:
  void loop() {
    long seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = current_;
      }
      job->entered.fetch_add(1);
      if (!job->closed.load()) (*job->body)();
      job->left.fetch_add(1);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  long generation_ = 0;
  std::shared_ptr<Job> current_;
};

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  constexpr long kSerial = 200000, kParallel = 800000, kPieces = 32;
  Pool pool(threads - 1);
  const char* names[] = {"OpenMP region", "pool"};
  for (int way = 0; way < 2; ++way) {
    std::vector<double> steps;
    for (int rep = 0; rep < 40; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < 10; ++r) {
        work(kSerial);
        std::atomic<long> taken{0};
        const std::function<void()> body = [&] {
          for (long p; (p = taken.fetch_add(1)) < kPieces;) work(kParallel / kPieces);
        };
        if (threads == 1) {
          body();
        } else if (way == 0) {
#pragma omp parallel num_threads(threads)
          body();
        } else {
          pool.run(body);
        }
      }
      steps.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(steps.begin(), steps.end());
    std::printf("%-14s %d thread(s): step median %6.2f ms (min %6.2f, max %6.2f)\n", names[way], threads,
                steps[steps.size() / 2], steps.front(), steps.back());
  }
  std::fflush(stdout);
  std::_Exit(0);  // the pool's workers are detached and never joined
}
