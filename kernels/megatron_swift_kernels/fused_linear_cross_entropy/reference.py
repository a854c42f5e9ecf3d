"""Cross entropy over a chunk of logits in pure torch (the `torch` backend), and the unfused reference.

The fused op (autograd.py) walks the vocabulary in column chunks; for each chunk of [tokens, columns]
fp32 logits it needs two steps, given here in torch and in triton_impl.py as kernels:

- `chunk_stats`: per row, the max, the sum of exp(logit - max) and the target's logit when the target
  is in the chunk (else 0); the logits may be overwritten (the op computes them again for the gradient);
- `chunk_grad_`: in place, the logits become the loss gradient (softmax - onehot(target)) * scale,
  given the global log-sum-exp of every row.

Vocabulary padding never reaches them: the op leaves the padding columns out of its chunks.

`linear_cross_entropy` is the plain single-rank computation (full logits, F.cross_entropy) that the
fused op is tested and benchmarked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_stats(logits: torch.Tensor, target_local: torch.Tensor):
    """logits [c, columns] fp32 (overwritten); target_local [c]: column of the target, -1 when not in the chunk."""
    row_max = logits.max(dim=-1).values
    hit = target_local >= 0
    picked = logits.gather(1, target_local.clamp(min=0)[:, None]).squeeze(1)
    sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)  # in place: no chunk-sized temporary
    return row_max, sum_exp, torch.where(hit, picked, torch.zeros_like(picked))


def chunk_grad_(logits, target_local, lse, scale) -> torch.Tensor:
    """In place: logits <- (exp(logits - lse) - onehot(target_local)) * scale."""
    logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    rows = (target_local >= 0).nonzero().squeeze(1)
    logits[rows, target_local[rows]] -= scale[rows]
    return logits


def linear_cross_entropy(hidden, weight, target, token_weight=None, ignore_index: int = -100, vocab_size=None):
    """Sum over tokens of token_weight * CE(hidden @ weight.T, target), full logits (single rank)."""
    logits = (hidden.to(weight.dtype) @ weight.t()).float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    if token_weight is not None:
        losses = losses * token_weight.float()
    return losses.sum()
