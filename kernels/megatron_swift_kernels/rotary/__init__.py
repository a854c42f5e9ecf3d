"""Rotary embedding apply ([s, b, h, d] and packed THD): pure-torch reference, Triton kernel, autograd."""

from megatron_swift_kernels.rotary.autograd import apply_rotary, apply_rotary_thd

__all__ = ["apply_rotary", "apply_rotary_thd"]
