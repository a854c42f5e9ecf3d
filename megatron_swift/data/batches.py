"""Global batches for the training loop: deterministic order over epochs, exact split over data-parallel ranks.

The loop only needs `next_microbatches(dp_rank, dp_size, micro_batch_size)` and a settable
`consumed_samples` (saved in checkpoints, restored on resume): the `Batches` protocol. Every rank
computes the same order and takes its own contiguous slice of each global batch, so the union over
ranks is the same whatever the DP size (what makes DP2 equal DP1), and a resumed run continues
exactly where the checkpoint stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from megatron_swift.data.errors import DataError


class Batches(Protocol):
    consumed_samples: int

    def next_microbatches(self, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]: ...


class GlobalBatches:
    """Map-style items (samples, packed rows or pretraining windows), reshuffled by seed every epoch."""

    def __init__(self, items: Sequence, global_batch_size: int, seed: int, shuffle: bool, collate: Callable):
        if not len(items):
            raise DataError("no training samples")
        self.items, self.global_batch_size, self.seed, self.shuffle = items, global_batch_size, seed, shuffle
        self.collate = collate
        self.consumed_samples = 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), the last one used

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        if not self.shuffle:
            return offset
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.items), generator=generator))
        return int(self._order[1][offset])

    def next_microbatches(self, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""
        per_rank = self.global_batch_size // dp_size
        first = self.consumed_samples + dp_rank * per_rank
        picked = [self.items[self._index(first + i)] for i in range(per_rank)]
        self.consumed_samples += self.global_batch_size
        return [
            self.collate(picked[start : start + micro_batch_size]) for start in range(0, per_rank, micro_batch_size)
        ]
