"""`rms_norm(x, weight, eps, backend)`: the op as used by models, with the Triton path's autograd."""

from __future__ import annotations

import torch

from megatron_swift_kernels.rmsnorm.reference import rms_norm as rms_norm_reference


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from megatron_swift_kernels.rmsnorm.triton_impl import rmsnorm_forward

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = rmsnorm_forward(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from megatron_swift_kernels.rmsnorm.triton_impl import rmsnorm_backward

        rows, weight, rstd = ctx.saved_tensors
        dx, dweight = rmsnorm_backward(dy.reshape(rows.shape).contiguous(), rows, weight.contiguous(), rstd)
        return dx.view(dy.shape), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return TritonRMSNorm.apply(x, weight, eps)
    if backend == "torch":
        return rms_norm_reference(x, weight, eps)
    raise ValueError(f"rmsnorm: no {backend!r} implementation here (TE's norm is used through its layer spec)")
