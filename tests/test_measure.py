"""megatron_swift/training/measure.py: the one step-time and peak-memory implementation that the training loop's
records, the techniques comparison and the step benchmarks share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_swift.training import measure


def test_peak_memory_sees_a_torch_allocation_after_a_reset():
    measure.reset_peak_memory()
    before = measure.peak_memory_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert measure.peak_memory_bytes() - before >= 60 * 2**20
    del block
    measure.reset_peak_memory()  # the mark drops back once the block is freed
    assert measure.peak_memory_bytes() < before + 32 * 2**20


def test_median_step_seconds_leaves_the_warmup_out():
    assert measure.median_step_seconds([9.0, 7.0, 1.0, 3.0, 2.0], warmup=2) == 2.0
    assert measure.median_step_seconds([9.0, 1.0], warmup=5) == 5.0  # too few steps: all of them
    with pytest.raises(ValueError):
        measure.median_step_seconds([], warmup=0)


def test_the_step_benchmarks_use_the_library_code():
    saved = list(sys.path)  # the benchmark scripts put the repository first on the path when imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import memory
        import train_step
    finally:
        sys.path[:] = saved  # benchmarks/kernels.py must not shadow the kernels package for later imports
    assert memory.peak_rss is measure.peak_rss and memory.reset_peak_rss is measure.reset_peak_rss
    assert train_step.median_step_seconds is measure.median_step_seconds
    assert train_step.tokens_per_second is measure.tokens_per_second
