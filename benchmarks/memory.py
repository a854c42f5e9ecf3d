"""Peak resident memory of a stretch of work in this process (Linux), for CPU benchmarks.

The implementation is the library's (megatron_swift/training/measure.py), shared with the training loop's
records and the techniques comparison, so every figure is measured the same way.
"""

from __future__ import annotations

from megatron_swift.training.measure import peak_rss, reset_peak_rss, status_kib

__all__ = ["peak_rss", "reset_peak_rss", "status_kib"]
