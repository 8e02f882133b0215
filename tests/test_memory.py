"""Memory helpers: the batch-size rule and the CUDA/CPU peak measurement on CPU."""

from __future__ import annotations

import numpy as np

from dynface.core.memory import PeakMemory, batch_size_for_budget, measure_in_subprocess


def _allocate(n_bytes: int) -> int:
    with PeakMemory("cpu") as pm:
        block = np.ones(n_bytes // 8, dtype=np.float64)
        block += 1
    return pm.peak_bytes


def test_batch_size_rule() -> None:
    est = batch_size_for_budget(3e9, 5e9, 20 * 10**9)
    assert est.bytes_per_sample == 2e9 and est.bytes_fixed == 1e9 and est.batch_size == 9
    assert batch_size_for_budget(3e9, 5e9, 1e9).batch_size == 1
    assert batch_size_for_budget(1.0, 2.0, 10**12, max_batch=8).batch_size == 8


def test_peak_memory_in_a_fresh_process_sees_a_large_allocation() -> None:
    peak = measure_in_subprocess(_allocate, 400 * 2**20)
    # The block itself, plus at most the interpreter's own growth during the call.
    assert 380 * 2**20 < peak < 600 * 2**20


def test_peak_memory_in_process_after_a_larger_earlier_peak() -> None:
    # An earlier, larger peak must not leak into a later measurement.
    _allocate(600 * 2**20)
    peak = _allocate(100 * 2**20)
    assert peak < 400 * 2**20
