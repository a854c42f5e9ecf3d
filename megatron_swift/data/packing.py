"""Packing variable-length samples into fixed-length rows with per-document boundaries (THD).

A sample of n tokens trains n - 1 positions (inputs ids[:-1], targets ids[1:]), so a row of
`seq_length` positions holds samples whose n - 1 sum to at most seq_length. Rows are filled by
best-fit decreasing (deterministic). A packed micro-batch carries `position_ids` restarting at 0
per document and `cu_seqlens`, the int32 document offsets into the flattened [mbs * seq_length]
tokens (0 first, mbs * seq_length last; the padding at the end of a row is its own final segment,
with loss_mask 0), which is what megatron-core's `PackedSeqParams(qkv_format="thd")` takes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_swift.data.encode import Sample


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row: best-fit decreasing over positions (length - 1) per sample."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (free positions, row) sorted, for the best-fit search
    rows: list[list[int]] = []
    for index in order:
        need = lengths[index] - 1
        if need > capacity:
            raise ValueError(f"sample {index} needs {need} positions, more than seq_length={capacity}")
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([])
            left, row = capacity, len(rows) - 1
        else:
            left, row = free.pop(slot)
        rows[row].append(index)
        if left - need > 0:
            bisect.insort(free, (left - need, row))
    for row in rows:
        row.sort()  # documents in dataset order inside a row
    return rows


def padding_fraction(lengths: Sequence[int], rows: int, seq_length: int) -> float:
    """Fraction of the `rows` x `seq_length` positions that hold no sample."""
    return 1.0 - sum(n - 1 for n in lengths) / max(rows * seq_length, 1)


@dataclass(frozen=True)
class PackedCollate:
    seq_length: int
    pad_id: int

    def __call__(self, rows: list[list[Sample]]) -> dict[str, torch.Tensor]:
        shape = (len(rows), self.seq_length)
        tokens = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(shape)
        position_ids = torch.zeros(shape, dtype=torch.long)
        cu_seqlens = [0]
        for r, documents in enumerate(rows):
            at = 0
            for sample in documents:
                n = len(sample.ids) - 1
                ids = torch.from_numpy(sample.ids).long()
                tokens[r, at : at + n], labels[r, at : at + n] = ids[:-1], ids[1:]
                loss_mask[r, at : at + n] = torch.from_numpy(sample.weights[1:])
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
                cu_seqlens.append(r * self.seq_length + at)
            if at < self.seq_length:
                position_ids[r, at:] = torch.arange(self.seq_length - at)
                cu_seqlens.append((r + 1) * self.seq_length)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
                "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32)}  # fmt: skip


@dataclass(frozen=True)
class PaddedCollate:
    """One sample per row, padded to seq_length + 1 tokens: tokens, labels, loss_mask [mbs, seq_length]."""

    seq_length: int
    pad_id: int

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        window = self.seq_length + 1
        ids = torch.full((len(samples), window), self.pad_id, dtype=torch.long)
        weights = torch.zeros(len(samples), window)
        for r, sample in enumerate(samples):
            ids[r, : len(sample.ids)] = torch.from_numpy(sample.ids).long()
            weights[r, : len(sample.weights)] = torch.from_numpy(sample.weights)
        return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": weights[:, 1:]}
