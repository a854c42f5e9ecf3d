"""Peak resident memory of a stretch of work in this process (Linux), for CPU benchmarks.

`ru_maxrss` cannot be reset and tracemalloc does not see torch's allocations, so the kernel's
peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) where the measured work
starts, and VmHWM is read where it ends.
"""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since the last `reset_peak_rss`."""
    return status_kib("VmHWM") * 1024
