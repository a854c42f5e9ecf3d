"""The two per-chunk cross-entropy steps of the fused op as Triton kernels (see reference.py).

One program per token row, walking the vocabulary in blocks: `_ce_stats` keeps an online max and
rescaled sum of exponentials (one pass over the row), `_ce_grad` overwrites the row with its gradient.
The matmuls around them stay cuBLAS (torch), which is where the FLOPs are; these kernels replace the
several full-chunk temporaries an eager softmax makes. Arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _ce_stats(LOGITS, TARGET, MAX, SUM_EXP, TARGET_LOGIT, n_cols, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * n_cols
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # Lanes that have seen only padding stay at -inf; keep their exp() argument finite.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(x - safe_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    sum_exp = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    target = tl.load(TARGET + row)
    picked = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
    tl.store(MAX + row, row_max)
    tl.store(SUM_EXP + row, sum_exp)
    tl.store(TARGET_LOGIT + row, tl.where(target >= 0, picked, 0.0))


@triton.jit
def _ce_grad(LOGITS, TARGET, LSE, SCALE, n_cols, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * n_cols
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    target = tl.load(TARGET + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(base + cols, tl.where(cols < n_valid, grad, 0.0), mask=mask)


def chunk_stats(logits, target_local, n_valid: int, out=None):
    """Same contract as reference.chunk_stats; `out` = (max, sum_exp, target_logit) buffers."""
    rows, n_cols = logits.shape
    if out is None:
        out = tuple(torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    _ce_stats[(rows,)](logits, target_local, *out, n_cols, n_valid, BLOCK=min(BLOCK, triton.next_power_of_2(n_valid)))
    return out


def chunk_grad_(logits, target_local, lse, scale, n_valid: int):
    rows, n_cols = logits.shape
    _ce_grad[(rows,)](logits, target_local, lse, scale, n_cols, n_valid,
                      BLOCK=min(BLOCK, triton.next_power_of_2(n_cols)))  # fmt: skip
    return logits
