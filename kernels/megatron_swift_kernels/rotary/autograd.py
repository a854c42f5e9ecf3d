"""`apply_rotary` / `apply_rotary_thd` with a backend: the op as models use it, and the Triton autograd.

The frequencies are constants (megatron-core builds them from buffers), so no gradient flows to them.
"""

from __future__ import annotations

import torch

from megatron_swift_kernels.rotary import reference


class TritonRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, positions):
        from megatron_swift_kernels.rotary.triton_impl import rotary_apply

        ctx.save_for_backward(cos, sin, positions)
        return rotary_apply(x.contiguous(), cos, sin, positions)

    @staticmethod
    def backward(ctx, dy):
        from megatron_swift_kernels.rotary.triton_impl import rotary_apply

        cos, sin, positions = ctx.saved_tensors
        return rotary_apply(dy.contiguous(), cos, sin, positions, backward=True), None, None, None


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0, backend: str = "torch"):
    """t: [s, b, heads, d]; freqs: [>= s, 1, 1, rot_dim]."""
    if backend == "torch":
        return reference.apply_rotary(t, freqs, mscale)
    _check(backend)
    s, b, heads, d = t.shape
    cos, sin = (table.contiguous() for table in reference.rotary_tables(freqs[:s], t.dtype, mscale))
    positions = torch.arange(s, device=t.device, dtype=torch.int32).repeat_interleave(b)
    return TritonRotary.apply(t.reshape(s * b, heads, d), cos, sin, positions).view(s, b, heads, d)


def apply_rotary_thd(t, cu_seqlens, freqs, mscale: float = 1.0, backend: str = "torch"):
    """t: [tokens, heads, d] packed; cu_seqlens: [documents + 1] offsets; positions restart per document."""
    if backend == "torch":
        return reference.apply_rotary_thd(t, cu_seqlens, freqs, mscale)
    _check(backend)
    cos, sin = (table.contiguous() for table in reference.rotary_tables(freqs, t.dtype, mscale))
    positions = reference.thd_positions(cu_seqlens, t.shape[0]).to(torch.int32)
    return TritonRotary.apply(t, cos, sin, positions)


def _check(backend: str) -> None:
    if backend != "triton":
        raise ValueError(f"rotary: no {backend!r} implementation")
