"""`swiglu(fc1_output, backend)`: the op as used by the MLP, with the Triton path's autograd."""

from __future__ import annotations

import torch

from kernels.swiglu.reference import swiglu as swiglu_reference


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_output):
        from kernels.swiglu.triton_impl import swiglu_forward

        rows = fc1_output.reshape(-1, fc1_output.shape[-1]).contiguous()
        ctx.save_for_backward(rows)
        return swiglu_forward(rows).view(*fc1_output.shape[:-1], fc1_output.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        from kernels.swiglu.triton_impl import swiglu_backward

        (rows,) = ctx.saved_tensors
        dx = swiglu_backward(rows, dy.reshape(rows.shape[0], -1).contiguous())
        return dx.view(*dy.shape[:-1], rows.shape[-1])


def swiglu(fc1_output: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if fc1_output.shape[-1] % 2:
        raise ValueError(f"swiglu: the fc1 output's last dimension ({fc1_output.shape[-1]}) must be even")
    if backend == "triton":
        return TritonSwiGLU.apply(fc1_output)
    if backend == "torch":
        return swiglu_reference(fc1_output)
    raise ValueError(f"swiglu: no {backend!r} implementation")
