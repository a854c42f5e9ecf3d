"""Step time and peak memory: the one implementation behind the training loop's records, the techniques
comparison (`python -m megatron_swift.bench techniques`) and the step benchmarks (benchmarks/).

Peak memory is the CUDA allocator's peak on a GPU and the process's peak resident set (VmHWM) on CPU.
`ru_maxrss` cannot be reset and tracemalloc does not see torch's allocations, so on CPU the kernel's
peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) where the measured work starts;
where /proc is not writable the peak since the process started is reported instead.
Step time is the median of the steps after `warmup` (the first steps build caches and optimizer state).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since the last `reset_peak_rss` (or the process start)."""
    try:
        return status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):  # no /proc (not Linux): the process's peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> None:
    """Start a peak-memory measurement: the CUDA allocator's peak on a GPU, else the peak-RSS mark."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # /proc/self/clear_refs not writable: the peak counts from the process start
        reset_peak_rss()


def peak_memory_bytes() -> int:
    """This process's peak memory since `reset_peak_memory` (allocated CUDA memory on a GPU, RSS on CPU)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss()


def median_step_seconds(step_seconds: Sequence[float], warmup: int) -> float:
    """The median of the steps after the first `warmup` (all of them when there are no more)."""
    if not step_seconds:
        raise ValueError("no step times to summarise")
    measured = list(step_seconds[warmup:]) or list(step_seconds)
    return statistics.median(measured)


def tokens_per_second(tokens_per_step: int, step_seconds: float) -> float:
    return tokens_per_step / step_seconds
