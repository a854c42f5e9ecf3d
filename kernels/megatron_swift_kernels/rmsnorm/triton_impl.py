"""RMSNorm forward and backward in Triton, over rows of a contiguous [rows, hidden] tensor.

Programs work on tiles of ROWS rows x the whole (padded) row: one row per program for model-sized
hidden dimensions, several for small ones (q/k norms over a head dimension), so a program always has
about TILE elements of work. Forward: statistics in fp32, the reciprocal RMS saved for the backward.
Backward: each program walks a contiguous range of tiles, writes their input gradients and accumulates
its share of the weight gradient in fp32; the per-program partial sums ([programs, hidden]) are added by
torch afterwards, so no atomics and a deterministic result.

All arithmetic is fp32; half-precision values exist only at loads and stores (Triton's CPU interpreter
computes bf16 x bf16 products wrongly, and a GPU upcasts them anyway). Rows past the end are masked
through a bound on the column index (`cols < where(row < n_rows, n_cols, 0)`): the interpreter rejects
a column mask and-ed with a per-row condition of a different shape.

Launchers take optional `out` buffers so the tests can hand in poisoned (NaN-filled) outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit one block
TILE = 4096  # elements per program tile


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = cols < tl.where(rows < n_rows, n_cols, 0)
    x = tl.load(X + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    # The reference rounds the normalised row to the input dtype before scaling (HF's convention).
    y = w * (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    tl.store(RSTD + row_ids, rstd, mask=row_ids < n_rows)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, tiles_per_program,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for tile in range(0, tiles_per_program):
        row_ids = (pid.to(tl.int64) * tiles_per_program + tile) * ROWS + tl.arange(0, ROWS)
        rows = row_ids[:, None]
        mask = cols < tl.where(rows < n_rows, n_cols, 0)
        x = tl.load(X + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row_ids, n_rows - 1))[:, None]  # rows past the end: masked above
        x_hat = x * rstd
        dx_hat = dy * w
        # d/dx of x * rstd(x): rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))
        dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0)[None, :], mask=cols < n_cols)


def _tile(n_cols: int) -> tuple[int, int]:
    """(ROWS, BLOCK) for a row length."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rmsnorm: hidden size {n_cols} exceeds the kernel's {MAX_HIDDEN}")
    block = triton.next_power_of_2(n_cols)
    return max(1, TILE // block), block


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None, rstd=None):
    """x: contiguous [rows, hidden]; returns (y, rstd[rows] fp32)."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x) if out is None else out
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if rstd is None else rstd
    rows, block = _tile(n_cols)
    _rmsnorm_fwd[(triton.cdiv(n_rows, rows),)](x, weight, out, rstd, n_rows, n_cols, eps, ROWS=rows, BLOCK=block)
    return out, rstd


def rmsnorm_backward(dy, x, weight, rstd, dx=None, programs: int | None = None, rows_per_tile: int | None = None):
    """Returns (dx, dweight) for contiguous [rows, hidden] dy and x."""
    n_rows, n_cols = x.shape
    rows, block = _tile(n_cols)
    rows = rows_per_tile or rows
    tiles = triton.cdiv(n_rows, rows)
    programs = max(1, min(tiles, programs or (512 if x.is_cuda else 4)))
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program)
    dx = torch.empty_like(x) if dx is None else dx
    partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    _rmsnorm_bwd[(programs,)](dy, x, weight, rstd, dx, partial, n_rows, n_cols, tiles_per_program,
                              ROWS=rows, BLOCK=block)  # fmt: skip
    return dx, partial.sum(0).to(weight.dtype)
