"""How many threads the C++ CPU kernels take (csrc/cpu/kernel_threads.cpp): its reading of
/proc/stat, on a made-up file and on this machine, and ``dirfast.set_cpu_threads`` with a busy
process beside this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import dirfast
from dirfast import _ext

pytestmark = [
    pytest.mark.skipif(_ext.CPU is None, reason=f"cpp unavailable: {_ext.CPU_REASON}"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the free cores are read from Linux's /proc/stat"),
]


def _cores():
    return sorted(os.sched_getaffinity(0))


def test_read_busy_cpus_counts_this_process_cpus(tmp_path):
    """Busy = user + nice + system + irq + softirq + steal ticks (not idle, not I/O wait) of the
    CPUs in this process's affinity mask, over the clock's ticks per second; the all-CPUs line,
    CPUs outside the mask, malformed lines and what follows the CPU lines are not counted."""
    allowed = _cores()
    outside = max(allowed) + 1
    lines = [f"cpu  {allowed[0]} 900 900 900 900 900 900 900 0 0"]  # all CPUs: its first number a CPU's
    busy_ticks = 0
    for i, cpu in enumerate(allowed + [outside]):
        user, nice, system, idle, iowait, irq, softirq, steal = (10 + i, 2, 30, 5000, 700, 4, 5, 6)
        lines.append(f"cpu{cpu} {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0")
        if cpu != outside:
            busy_ticks += user + nice + system + irq + softirq + steal
    lines += [f"cpu{allowed[0]} not numbers", "intr 1 2 3", f"cpu{allowed[0]} 9 9 9 9 9 9 9 9 0 0"]
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "stat").write_text("\n".join(lines) + "\n")
    busy_s, cpus = _ext.CPU._read_busy_cpus(str(tmp_path))
    assert cpus == len(allowed)
    assert busy_s == pytest.approx(busy_ticks / os.sysconf("SC_CLK_TCK"))
    assert _ext.CPU._read_busy_cpus(str(tmp_path / "missing")) is None


def test_read_busy_cpus_reads_this_machine():
    """On this machine: every CPU of the mask, and the busy time since boot."""
    busy_s, cpus = _ext.CPU._read_busy_cpus("")
    assert cpus == len(_cores()) and busy_s > 0


def test_cpu_threads_take_only_free_cores():
    """With "free", the C++ kernels take no more threads than the cores other processes leave
    free: with a busy process beside this one, fewer than the cores this process may use (read
    every 100 ms, so within a few tenths of a second). With "all", torch's threads as they are."""
    cores = len(_cores())
    if cores < 2:
        pytest.skip("needs two cores")
    threads = torch.get_num_threads()
    assert dirfast.get_cpu_threads() == "all"  # tests/conftest.py
    try:
        torch.set_num_threads(cores)
        assert _ext.CPU.kernel_threads() == cores
        dirfast.set_cpu_threads("free")
        assert dirfast.get_cpu_threads() == "free" and 1 <= _ext.CPU.kernel_threads() <= cores
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            seen = []
            for _ in range(30):  # the spinning process shows from the second read on
                time.sleep(0.11)
                seen.append(_ext.CPU.kernel_threads())
                if seen[-1] < cores:
                    break
            assert seen[-1] < cores, seen
        finally:
            busy.kill()
            busy.wait()
        dirfast.set_cpu_threads("all")
        assert _ext.CPU.kernel_threads() == cores
    finally:
        dirfast.set_cpu_threads("all")
        torch.set_num_threads(threads)
