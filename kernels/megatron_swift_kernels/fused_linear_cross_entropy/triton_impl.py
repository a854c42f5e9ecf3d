"""The two per-chunk cross-entropy steps of the fused op as Triton kernels (see reference.py).

Each program takes a tile of token rows (one or two for real vocabularies, more for small ones) and walks
the vocabulary in blocks: `_ce_stats` keeps an online max and
rescaled sum of exponentials (one pass over the row), `_ce_grad` overwrites the row with its gradient.
The matmuls around them stay cuBLAS (torch), which is where the FLOPs are; these kernels replace the
several full-chunk temporaries an eager softmax makes. Arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
TILE = 4096  # elements per program step: several rows at once only for small vocabularies


@triton.jit
def _ce_stats(LOGITS, TARGET, MAX, SUM_EXP, TARGET_LOGIT, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows = row_ids[:, None]
    row_cols = tl.where(rows < n_rows, n_cols, 0)  # rows past the end read nothing
    running_max = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(LOGITS + rows * n_cols + cols, mask=cols < row_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # Lanes that have seen only masked elements stay at -inf; keep their exp() argument finite.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(x - safe_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=1)
    safe_row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = tl.sum(running_sum * tl.exp(running_max - safe_row_max[:, None]), axis=1)
    in_range = row_ids < n_rows
    safe_rows = tl.minimum(row_ids, n_rows - 1)
    target = tl.load(TARGET + safe_rows)
    picked = tl.load(LOGITS + safe_rows * n_cols + tl.maximum(target, 0)).to(tl.float32)
    tl.store(MAX + row_ids, row_max, mask=in_range)
    tl.store(SUM_EXP + row_ids, sum_exp, mask=in_range)
    tl.store(TARGET_LOGIT + row_ids, tl.where(target >= 0, picked, 0.0), mask=in_range)


@triton.jit
def _ce_grad(LOGITS, TARGET, LSE, SCALE, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    safe_rows = tl.minimum(row_ids, n_rows - 1)
    rows = row_ids[:, None]
    lse = tl.load(LSE + safe_rows)[:, None]
    scale = tl.load(SCALE + safe_rows)[:, None]
    target = tl.load(TARGET + safe_rows)[:, None]
    row_cols = tl.where(rows < n_rows, n_cols, 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = cols < row_cols
        x = tl.load(LOGITS + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(LOGITS + rows * n_cols + cols, grad, mask=mask)


def _tile(n: int) -> tuple[int, int]:
    block = min(BLOCK, triton.next_power_of_2(n))
    return max(1, TILE // block), block


def chunk_stats(logits, target_local, out=None):
    """Same contract as reference.chunk_stats (the logits are left unchanged here); `out` = (max, sum_exp,
    target_logit) buffers."""
    n_rows, n_cols = logits.shape
    if out is None:
        out = tuple(torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    rows, block = _tile(n_cols)
    _ce_stats[(triton.cdiv(n_rows, rows),)](logits, target_local, *out, n_rows, n_cols, ROWS=rows, BLOCK=block)
    return out


def chunk_grad_(logits, target_local, lse, scale):
    n_rows, n_cols = logits.shape
    rows, block = _tile(n_cols)
    _ce_grad[(triton.cdiv(n_rows, rows),)](logits, target_local, lse, scale, n_rows, n_cols, ROWS=rows, BLOCK=block)
    return logits
