"""What a fresh output's page faults cost (csrc/pages.h): ``python -m benchmarks.huge_pages``.

Times, interleaved, for float32 tensors of 8, 32 and 128 MiB on the threads torch has: a clone
(``x.clone()``), the same copy into ``torch.empty_like(x)`` advised onto transparent huge pages
(``madvise(MADV_HUGEPAGE)`` on its 2 MiB-aligned span, as dirfast's CPU kernels advise their large
outputs), an in-place pass (``x.mul_(1)``, no page faults), and dirfast's out-of-place and
in-place calibrate over 97 bins. Prints medians, the load average and the kernel's THP setting.
Linux only.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time

import torch

import dirfast

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def advised_empty_like(x, libc):
    y = torch.empty_like(x)
    begin = y.data_ptr()
    first = (begin + HUGE - 1) & ~(HUGE - 1)
    last = (begin + y.numel() * y.element_size()) & ~(HUGE - 1)
    if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_HUGEPAGE):
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    return y


def main(rounds=15):
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    print(f"transparent_hugepage: {thp}; threads {torch.get_num_threads()}; load before {os.getloadavg()}")
    for mib in (8, 32, 128):
        x = torch.randn(mib << 18 >> 9, 512)
        idx = torch.randint(0, 97, (x.shape[0],))
        stats = [torch.rand(97, 512) + 0.5 for _ in range(4)]
        work = {
            "clone": lambda: x.clone(),
            "copy to huge pages": lambda: advised_empty_like(x, libc).copy_(x),
            "in-place pass": lambda: x.mul_(1),
            "dirfast calibrate": lambda: dirfast.ops.calibrate(x, idx, *stats),
            "dirfast calibrate_": lambda: dirfast.ops.calibrate_(x, idx, *stats),
        }
        times = {k: [] for k in work}
        for _ in range(rounds):
            for name, f in work.items():
                t0 = time.perf_counter()
                out = f()
                times[name].append(time.perf_counter() - t0)
                del out
        clone = statistics.median(times["clone"])
        for name, t in times.items():
            med = statistics.median(t)
            print(f"{mib:4d} MiB  {name:20s} {med * 1e3:8.2f} ms  {med / clone:5.2f} clones")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
