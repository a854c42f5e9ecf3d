"""Compatibility layer: every patch of a third-party symbol lives here and nowhere else."""

from megatron_swift.compat.cpu import DEFINED_SYMBOLS, PATCHED_SYMBOLS, apply_cpu_shims, cuda_redirects

__all__ = ["DEFINED_SYMBOLS", "PATCHED_SYMBOLS", "apply_cpu_shims", "cuda_redirects"]
