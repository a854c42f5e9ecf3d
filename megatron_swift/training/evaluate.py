"""Validation loss during training: the held-out split (`data.split_dataset_ratio`) or the validation files
(`data.val_dataset`) through megatron-core's forward-only schedule, with the training loss (token-weighted
over the loss mask, so the number is the mean over every validation target token whatever the layout).

Validation items are cut into global batches like training data: every data-parallel rank takes its
contiguous slice of each. The last global batch is filled up with copies of the first item whose loss
mask is zero (preference pairs: whose pair weight is zero), so each item counts exactly once and every rank runs
the same number of micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Validation:
    loss: float  # token mean over the validation targets
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def validation_microbatches(
    items: Sequence, collate: Callable, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
    max_batches: int | None = None,
) -> Iterator[list[dict[str, torch.Tensor]]]:  # fmt: skip
    """This rank's micro-batches of each validation global batch (at most `max_batches` of them)."""
    per_rank = global_batch_size // dp_size
    batches = math.ceil(len(items) / global_batch_size)
    for batch in range(batches if max_batches is None else min(batches, max_batches)):
        positions = [batch * global_batch_size + dp_rank * per_rank + i for i in range(per_rank)]
        microbatches = []
        for start in range(0, per_rank, micro_batch_size):
            chunk = positions[start : start + micro_batch_size]
            microbatch = collate([items[p] if p < len(items) else items[0] for p in chunk])
            fillers = torch.tensor([p >= len(items) for p in chunk])
            if "pair_weight" in microbatch:  # preference pairs (data/pairs.py): rows are [chosen..., rejected...]
                microbatch["pair_weight"][fillers] = 0.0
            else:
                microbatch["loss_mask"][fillers] = 0.0
            microbatches.append(microbatch)
        yield microbatches


def validation_loss(chunks, microbatch_groups: Iterator[list[dict]], vocab_size: int) -> Validation:
    """Forward-only over every group of micro-batches (collective: all ranks call it at the same step)."""
    from megatron_swift.training.optim import parameters_synced
    from megatron_swift.training.step import global_loss_sum, run_schedule

    loss_sum, tokens = 0.0, 0
    with torch.no_grad(), parameters_synced(chunks):
        for chunk in chunks:
            chunk.eval()
        for microbatches in microbatch_groups:
            batch_sum, batch_tokens = global_loss_sum(run_schedule(chunks, microbatches, vocab_size, forward_only=True))
            loss_sum, tokens = loss_sum + batch_sum, tokens + batch_tokens
    for chunk in chunks:
        chunk.train()
    return Validation(loss_sum / max(tokens, 1), tokens)
