"""RMSNorm forward and backward in Triton, over rows of a contiguous [rows, hidden] tensor.

Forward: one program per row; statistics in fp32, the reciprocal RMS saved for the backward.
Backward: each program walks a contiguous block of rows, writes their input gradients and
accumulates its share of the weight gradient in fp32; the per-program partial sums ([programs, hidden])
are added by torch afterwards, so no atomics and a deterministic result.

All arithmetic is fp32; half-precision values exist only at loads and stores (Triton's CPU interpreter
computes bf16 x bf16 products wrongly, and a GPU upcasts them anyway).

Launchers take optional `out` buffers so the tests can hand in poisoned (NaN-filled) outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit one block


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # The reference rounds the normalised row to the input dtype before scaling (HF's convention).
    y = w * (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        # Rows past the end load nothing and store nothing. (Written as a bound on the columns: Triton's
        # interpreter rejects a tensor mask and-ed with a scalar condition.)
        mask = cols < tl.where(row < n_rows, n_cols, 0)
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, n_rows - 1))
        x_hat = x * rstd
        dx_hat = dy * w
        # d/dx of x * rstd(x): rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))
        dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / n_cols))
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


def _block(n_cols: int) -> int:
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rmsnorm: hidden size {n_cols} exceeds the kernel's {MAX_HIDDEN}")
    return triton.next_power_of_2(n_cols)


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None, rstd=None):
    """x: contiguous [rows, hidden]; returns (y, rstd[rows] fp32)."""
    rows, n_cols = x.shape
    out = torch.empty_like(x) if out is None else out
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if rstd is None else rstd
    _rmsnorm_fwd[(rows,)](x, weight, out, rstd, n_cols, eps, BLOCK=_block(n_cols))
    return out, rstd


def rmsnorm_backward(dy, x, weight, rstd, dx=None, programs: int | None = None):
    """Returns (dx, dweight) for contiguous [rows, hidden] dy and x."""
    rows, n_cols = x.shape
    programs = max(1, min(rows, programs or (256 if x.is_cuda else 4)))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    dx = torch.empty_like(x) if dx is None else dx
    partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    _rmsnorm_bwd[(programs,)](dy, x, weight, rstd, dx, partial, rows, n_cols, rows_per_program, BLOCK=_block(n_cols))
    return dx, partial.sum(0).to(weight.dtype)
