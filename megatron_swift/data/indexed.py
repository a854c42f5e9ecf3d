"""Megatron indexed pretraining data (.bin + .idx) and GPT-style samples over token documents.

Writing uses megatron-core's own `IndexedDatasetBuilder` (the format is its, not ours), into
temporary paths renamed at the end, so an interrupted run never leaves a half-written pair.
`TokenWindows` builds GPT-style samples the way Megatron's GPTDataset does: documents (each ending
with EOD) in a seeded shuffled order are concatenated and cut into windows of seq_length + 1 tokens
with stride seq_length (the last token of a window is the first of the next), read lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from megatron_swift.data.encode import Sample
from megatron_swift.data.errors import DataError


def write_indexed(prefix: str | Path, documents: Iterable[np.ndarray], vocab_size: int) -> int:
    """Write documents (token id arrays) to PREFIX.bin / PREFIX.idx; returns the number written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(temporary + ".bin", dtype=DType.optimal_dtype(vocab_size))
    written = 0
    try:
        for document in documents:
            if len(document):
                builder.add_document(document, [len(document)])
                written += 1
        builder.finalize(temporary + ".idx")
        os.replace(temporary + ".bin", prefix + ".bin")
        os.replace(temporary + ".idx", prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            Path(temporary + suffix).unlink(missing_ok=True)
    return written


def is_indexed_prefix(path: str) -> bool:
    return Path(path + ".bin").is_file() and Path(path + ".idx").is_file()


class TokenWindows:
    """GPT-style samples: windows of seq_length + 1 tokens over the shuffled concatenation of documents."""

    def __init__(self, lengths: np.ndarray, read: Callable[[int, int, int], np.ndarray], seq_length: int,
                 seed: int, shuffle: bool = True):  # fmt: skip
        self.read, self.seq_length = read, seq_length
        count = len(lengths)
        self.order = np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)
        self.ends = np.cumsum(np.asarray(lengths, dtype=np.int64)[self.order])
        total = int(self.ends[-1]) if count else 0
        self.windows = max(0, (total - 1) // seq_length)
        if not self.windows:
            raise DataError(f"{total} tokens in all, fewer than one sample of seq_length + 1 = {seq_length + 1}")

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], seq_length: int, seed: int, shuffle: bool = True):
        lengths = np.array([len(s.ids) for s in samples])
        return cls(lengths, lambda doc, offset, length: samples[doc].ids[offset : offset + length], seq_length, seed,
                   shuffle)  # fmt: skip

    @classmethod
    def from_indexed(cls, prefix: str, seq_length: int, seed: int, shuffle: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        return cls(dataset.sequence_lengths, lambda doc, offset, length: dataset.get(doc, offset, length),
                   seq_length, seed, shuffle)  # fmt: skip

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> Sample:
        start, stop = index * self.seq_length, index * self.seq_length + self.seq_length + 1
        pieces = []
        position = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            doc_start = int(self.ends[position - 1]) if position else 0
            take = min(stop, int(self.ends[position])) - start
            pieces.append(self.read(int(self.order[position]), start - doc_start, take))
            start += take
            position += 1
        ids = np.concatenate(pieces).astype(np.int32)
        return Sample(ids, np.ones(len(ids), dtype=np.float32))
