"""`swiglu(fc1_output, backend)`: the op as used by the MLP, with autograd for both backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchSwiGLU(torch.autograd.Function):
    """The reference's arithmetic (reference.py) with a backward that writes [d gate | d up] in place.

    Autograd of the reference ends in `chunk`'s backward, a `cat` of the two half-gradients: one more
    full pass over the [tokens, 2 * ffn] gradient per layer. Here each half is written straight into
    its side of one buffer. The ops and their order are the reference's, so results are bitwise equal;
    the saved tensors are the same as autograd saves for the reference (the input and silu(gate)).
    """

    @staticmethod
    def forward(ctx, fc1_output):
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(fc1_output, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, dy):
        fc1_output, silu_gate = ctx.saved_tensors
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        dx = torch.empty_like(fc1_output)
        dgate, dup = torch.chunk(dx, 2, dim=-1)
        torch.mul(dy, silu_gate, out=dup)
        torch.ops.aten.silu_backward(dy * up, gate, grad_input=dgate)
        return dx


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_output):
        from megatron_swift_kernels.swiglu.triton_impl import swiglu_forward

        rows = fc1_output.reshape(-1, fc1_output.shape[-1]).contiguous()
        ctx.save_for_backward(rows)
        return swiglu_forward(rows).view(*fc1_output.shape[:-1], fc1_output.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        from megatron_swift_kernels.swiglu.triton_impl import swiglu_backward

        (rows,) = ctx.saved_tensors
        dx = swiglu_backward(rows, dy.reshape(rows.shape[0], -1).contiguous())
        return dx.view(*dy.shape[:-1], rows.shape[-1])


def swiglu(fc1_output: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if fc1_output.shape[-1] % 2:
        raise ValueError(f"swiglu: the fc1 output's last dimension ({fc1_output.shape[-1]}) must be even")
    if backend == "triton":
        return TritonSwiGLU.apply(fc1_output)
    if backend == "torch":
        return TorchSwiGLU.apply(fc1_output)
    raise ValueError(f"swiglu: no {backend!r} implementation")
