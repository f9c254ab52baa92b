// What csrc/module.cpp gives tests beyond the ops and the thread limit: entry points into the
// kernels' code that the dispatcher does not reach, defined in the kernel files they look into.
#pragma once

#include <cstdint>
#include <string>

namespace dirfast {

// What kernel_threads' free-cores limit reads (csrc/cpu/kernel_threads.cpp; Linux, elsewhere false):
// the busy seconds so far (all but idle and I/O wait) of the CPUs in this process's affinity mask
// that <root>/proc/stat lists, and how many those CPUs are; false where none can be read. root: ""
// in use, a directory laid out like / in tests.
bool read_busy_cpus(const std::string& root, double* busy_s, int64_t* cpus);

namespace cpu {

// mixture_logpdf's float32 forward of the n values x into out (and where gx is given, with the
// gradients, into gx and gv), on this thread, by the code of `lanes` float lanes (16: AVX-512, 8:
// AVX2 + FMA, 4: the baseline): tests compare the widths, which promise the same bits. False where
// this machine cannot run that code.
bool mixture_logpdf_lanes(const float* x, int64_t n, const float* means, const float* variances,
                          const float* log_weights, int64_t k, int lanes, float* out, float* gx, float* gv);

}  // namespace cpu
}  // namespace dirfast
