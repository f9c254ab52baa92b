// kernel_threads (csrc/parallel.h): torch's threads, but no more than the cores other processes
// leave free.
//
// A parallel region ends when its last thread does. Where another process holds a core, the thread
// that lands on it often runs only at the scheduler's next tick, and every region waits for it: on
// 2 threads with the other core busy, a training batch ran several times slower than on 1
// (benchmarks/results/cpu/threads-zen4.md, pairwise-busy-core.md). The free cores are read from
// /proc/stat at most every 100 ms: the busy time of the CPUs this process may run on (all but idle
// and I/O wait), less this process's own CPU time, over the time between two reads (more than
// kBusyShare of a core makes it busy). The kernels give the same bits on any number of threads, so
// the limit changes their speed only. Elsewhere than Linux, and until a second read, the threads
// are torch's.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>
#endif

#include "../parallel.h"
#include "../test_hooks.h"

namespace dirfast {
namespace {

constexpr int64_t kReadEveryNs = 100'000'000;
// Other processes' time that makes a core busy: more than a quarter of it. What they get is not
// what they would take: a loop holding one of two cores got only part of it while torch's own
// 2-thread copies ran between this process's calls, their OpenMP worker spinning beside the loop
// after each (benchmarks/results/cpu/threads-zen4.md).
constexpr double kBusyShare = 0.25;

std::atomic<bool> free_cores_only{true};
std::atomic<int64_t> free_cores{0};      // 0: not known yet
std::atomic<int64_t> last_read_ns{-kReadEveryNs};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

#if defined(__linux__)
// This process's CPU seconds so far, all its threads.
double own_cpu_s() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// A new read, if none is under way: the free cores since the last one.
void read_free_cores(int64_t now) {
  static std::mutex reading;
  static double last_busy_s = 0.0, last_own_s = 0.0;
  static int64_t last_ns = 0;
  std::unique_lock<std::mutex> lock(reading, std::try_to_lock);
  if (!lock.owns_lock() || now - last_read_ns.load(std::memory_order_relaxed) < kReadEveryNs) return;
  last_read_ns.store(now, std::memory_order_relaxed);
  double busy_s;
  int64_t cpus;
  if (!read_busy_cpus("", &busy_s, &cpus)) return;
  const double own_s = own_cpu_s();
  if (last_ns != 0 && own_s >= last_own_s) {  // (a forked child starts its own CPU time at 0: read again)
    const double others = ((busy_s - last_busy_s) - (own_s - last_own_s)) / (1e-9 * static_cast<double>(now - last_ns));
    const int64_t busy = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(others - kBusyShare)));
    free_cores.store(std::clamp<int64_t>(cpus - busy, 1, cpus), std::memory_order_relaxed);
  }
  last_busy_s = busy_s;
  last_own_s = own_s;
  last_ns = now;
}
#endif

}  // namespace

#if defined(__linux__)
bool read_busy_cpus(const std::string& root, double* busy_s, int64_t* cpus) {
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return false;
  std::FILE* stat = std::fopen((root + "/proc/stat").c_str(), "r");
  if (stat == nullptr) return false;
  unsigned long long ticks = 0;
  int64_t count = 0;
  char line[512];
  while (std::fgets(line, sizeof(line), stat) != nullptr && std::strncmp(line, "cpu", 3) == 0) {
    if (line[3] < '0' || line[3] > '9') continue;  // "cpu  ...": all CPUs together
    int cpu;
    unsigned long long user, nice, system, idle, iowait, irq, softirq, steal;
    if (std::sscanf(line + 3, "%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle,
                    &iowait, &irq, &softirq, &steal) != 9) {
      continue;
    }
    if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &allowed)) {
      ticks += user + nice + system + irq + softirq + steal;
      ++count;
    }
  }
  std::fclose(stat);
  *busy_s = static_cast<double>(ticks) / static_cast<double>(sysconf(_SC_CLK_TCK));
  *cpus = count;
  return count > 0;
}
#else
bool read_busy_cpus(const std::string&, double*, int64_t*) { return false; }
#endif

int64_t kernel_threads() {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  if (threads == 1 || !free_cores_only.load(std::memory_order_relaxed)) return threads;
#if defined(__linux__)
  const int64_t now = now_ns();
  if (now - last_read_ns.load(std::memory_order_relaxed) >= kReadEveryNs) read_free_cores(now);
  const int64_t free = free_cores.load(std::memory_order_relaxed);
  return free > 0 ? std::min(threads, free) : threads;
#else
  return threads;
#endif
}

bool set_free_cores_only(bool on) { return free_cores_only.exchange(on); }

}  // namespace dirfast
