"""SwiGLU forward and backward in Triton over a contiguous [rows, 2 * ffn] fc1 output.

Grid: (row tiles, column blocks of the ffn half); a tile is ROWS rows x BLOCK columns, about TILE
elements (several rows per program only when the ffn is small). Arithmetic in fp32 (see
rmsnorm/triton_impl.py for why, and for the row masking); the backward recomputes the sigmoid instead
of saving it, so only the fc1 output is kept for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
TILE = 4096


@triton.jit
def _tile_offsets(n_rows, ffn, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    return row, cols, cols < tl.where(row < n_rows, ffn, 0)


@triton.jit
def _swiglu_fwd(X, Y, n_rows, ffn, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _tile_offsets(n_rows, ffn, ROWS, BLOCK)
    gate = tl.load(X + row * 2 * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * ffn + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * ffn + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, n_rows, ffn, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _tile_offsets(n_rows, ffn, ROWS, BLOCK)
    gate = tl.load(X + row * 2 * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * ffn + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DX + row * 2 * ffn + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * 2 * ffn + ffn + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, n_rows: int, ffn: int, block: int, *tensors) -> None:
    block = min(block, triton.next_power_of_2(ffn))  # block: a power of two
    rows = max(1, TILE // block)
    kernel[(triton.cdiv(n_rows, rows), triton.cdiv(ffn, block))](*tensors, n_rows, ffn, ROWS=rows, BLOCK=block)


def swiglu_forward(x: torch.Tensor, out=None, block: int = BLOCK) -> torch.Tensor:
    """x: contiguous [rows, 2 * ffn]; returns [rows, ffn]."""
    n_rows, ffn = x.shape[0], x.shape[1] // 2
    out = torch.empty(n_rows, ffn, dtype=x.dtype, device=x.device) if out is None else out
    _launch(_swiglu_fwd, n_rows, ffn, block, x, out)
    return out


def swiglu_backward(x: torch.Tensor, dy: torch.Tensor, dx=None, block: int = BLOCK) -> torch.Tensor:
    n_rows, ffn = dy.shape
    dx = torch.empty_like(x) if dx is None else dx
    _launch(_swiglu_bwd, n_rows, ffn, block, x, dy, dx)
    return dx
