"""Compatibility layer: every patch of a third-party symbol lives here and nowhere else, and the list of the
megatron-core internals the rest of the code relies on (upstream.py)."""

from megatron_swift.compat.checkpoint_writer import CHECKPOINT_WRITER_SYMBOLS, keep_checkpoint_writer_in_process
from megatron_swift.compat.cpu import (
    DEFINED_SYMBOLS,
    PATCHED_SYMBOLS,
    apply_cpu_shims,
    cpu_shims_applied,
    cuda_redirects,
    device_redirect_suspended,
    leave_device_redirect,
)
from megatron_swift.compat.device_audit import DEVICE_AUDIT_SYMBOLS
from megatron_swift.compat.distrib_optimizer import FULLY_RESHARDABLE_SYMBOLS, compact_param_index_maps
from megatron_swift.compat.upstream import UPSTREAM_INTERNALS

__all__ = [
    "CHECKPOINT_WRITER_SYMBOLS",
    "DEFINED_SYMBOLS",
    "DEVICE_AUDIT_SYMBOLS",
    "FULLY_RESHARDABLE_SYMBOLS",
    "PATCHED_SYMBOLS",
    "UPSTREAM_INTERNALS",
    "apply_cpu_shims",
    "compact_param_index_maps",
    "cpu_shims_applied",
    "cuda_redirects",
    "device_redirect_suspended",
    "keep_checkpoint_writer_in_process",
    "leave_device_redirect",
]
