"""SwiGLU forward and backward in Triton over a contiguous [rows, 2 * ffn] fc1 output.

Grid: (rows, column blocks of the ffn half). Arithmetic in fp32 (see rmsnorm/triton_impl.py for why);
the backward recomputes the sigmoid instead of saving it, so only the fc1 output is kept for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd(X, Y, ffn, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn
    gate = tl.load(X + row * 2 * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * ffn + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * ffn + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, ffn, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn
    gate = tl.load(X + row * 2 * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * ffn + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DX + row * 2 * ffn + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * 2 * ffn + ffn + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)


def _grid(rows: int, ffn: int, block: int):
    return (rows, triton.cdiv(ffn, block))


def swiglu_forward(x: torch.Tensor, out=None, block: int = BLOCK) -> torch.Tensor:
    """x: contiguous [rows, 2 * ffn]; returns [rows, ffn]."""
    rows, ffn = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, ffn, dtype=x.dtype, device=x.device) if out is None else out
    _swiglu_fwd[_grid(rows, ffn, block)](x, out, ffn, BLOCK=block)
    return out


def swiglu_backward(x: torch.Tensor, dy: torch.Tensor, dx=None, block: int = BLOCK) -> torch.Tensor:
    rows, ffn = dy.shape
    dx = torch.empty_like(x) if dx is None else dx
    _swiglu_bwd[_grid(rows, ffn, block)](x, dy, dx, ffn, BLOCK=block)
    return dx
