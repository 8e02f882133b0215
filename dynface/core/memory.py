"""Peak-memory measurement and memory-aware batch sizes, on CUDA and on CPU.

CUDA numbers come from the caching allocator's peak statistics. On CPU the process's peak resident
set (`ru_maxrss`) is the only reliable figure, and it never goes down, so CPU measurements are made in
a fresh process per point (`measure_in_subprocess`).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start, or since `reset_peak_rss`).

    Linux: VmHWM of /proc/self/status, which belongs to the address space and so starts afresh at exec.
    (`ru_maxrss` does not: a process started by a large parent inherits the parent's peak.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak bytes used inside the block above the level at entry.

    CUDA: exact allocator peak. CPU: growth of the process's peak RSS (reset at entry where the kernel
    allows). Memory the allocator already holds from earlier work is reused without growing the RSS,
    so exact CPU figures need a fresh process per measurement (`measure_in_subprocess`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self._base = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = max(0, peak_rss_bytes() - self._base)


def measure_in_subprocess(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a picklable top-level function in a fresh spawned process and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def available_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class BatchEstimate:
    batch_size: int
    bytes_fixed: float  # per-call overhead independent of the batch
    bytes_per_sample: float
    budget_bytes: int


def batch_size_for_budget(
    peak_b1: float, peak_b2: float, budget_bytes: int, *, max_batch: int = 256
) -> BatchEstimate:
    """Largest batch under the budget, from peaks measured at batch 1 and 2 (memory is linear in b)."""
    per_sample = max(float(peak_b2 - peak_b1), 1.0)
    fixed = max(float(peak_b1) - per_sample, 0.0)
    size = int((budget_bytes - fixed) // per_sample)
    return BatchEstimate(max(1, min(size, max_batch)), fixed, per_sample, budget_bytes)
