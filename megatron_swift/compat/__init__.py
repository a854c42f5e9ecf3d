"""Compatibility layer: every patch of a third-party symbol lives here and nowhere else."""

from megatron_swift.compat.checkpoint_writer import CHECKPOINT_WRITER_SYMBOLS, keep_checkpoint_writer_in_process
from megatron_swift.compat.cpu import (
    DEFINED_SYMBOLS,
    PATCHED_SYMBOLS,
    apply_cpu_shims,
    cuda_redirects,
    device_redirect_suspended,
)
from megatron_swift.compat.device_audit import DEVICE_AUDIT_SYMBOLS

__all__ = [
    "CHECKPOINT_WRITER_SYMBOLS",
    "DEFINED_SYMBOLS",
    "DEVICE_AUDIT_SYMBOLS",
    "PATCHED_SYMBOLS",
    "apply_cpu_shims",
    "cuda_redirects",
    "device_redirect_suspended",
    "keep_checkpoint_writer_in_process",
]
