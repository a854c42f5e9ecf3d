"""Streaming training data for corpora larger than memory: rows read lazily, tokenized when drawn.

The stream is the datasets' rows in order (epoch after epoch), optionally through a seeded shuffle
buffer. Every data-parallel rank walks the same stream (reading and format-checking rows is cheap)
but tokenizes only its own slice of each global batch. Position in the stream is exactly
`consumed_samples`, so a resumed run replays the stream without tokenizing and skips exactly the
consumed samples. Sample positions must not depend on tokenization, so over-long samples are
truncated (truncation_strategy left/right), never deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from megatron_swift.data.encode import Encoder, Sample
from megatron_swift.data.errors import BadRows, DataError, RowProblem
from megatron_swift.data.labels import TruncationCounts, truncate
from megatron_swift.data.sources import DatasetSpec, Row, check_exists, iter_rows


class StreamingBatches:
    """The `Batches` protocol over a stream of rows; `consumed_samples` is the position in the stream."""

    def __init__(self, specs: list[str], encoder: Encoder, max_length: int, truncation: str, global_batch_size: int,
                 collate: Callable, seed: int, shuffle_buffer: int, bad: BadRows):  # fmt: skip
        self.paths = [DatasetSpec.parse(spec).path for spec in specs]
        for path in self.paths:
            check_exists(path)
        self.encoder, self.max_length, self.truncation = encoder, max_length, truncation
        self.global_batch_size, self.collate = global_batch_size, collate
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.bad, self.counts = bad, TruncationCounts()
        self.consumed_samples = 0

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @consumed_samples.setter
    def consumed_samples(self, value: int) -> None:
        """Restart the stream and skip `value` samples (no tokenization)."""
        self._consumed, self._stream = value, self._rows()
        for _ in range(value):
            next(self._stream)

    def _epoch(self) -> Iterator[Row]:
        for path in self.paths:
            for row in iter_rows(path, self.bad):
                try:
                    self.encoder.check(row)
                except RowProblem as problem:
                    self.bad.report(row.where, str(problem))
                    continue
                yield row

    def _rows(self) -> Iterator[Row]:
        for epoch in range(1 << 62):
            rows, found = self._epoch(), False
            if self.shuffle_buffer > 1:
                rows = _shuffled(rows, self.shuffle_buffer, np.random.default_rng(self.seed + epoch))
            for row in rows:
                found = True
                yield row
            if not found:
                raise DataError(f"{', '.join(map(str, self.paths))}: no usable rows")

    def next_microbatches(self, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
        per_rank = self.global_batch_size // dp_size
        rows = [next(self._stream) for _ in range(self.global_batch_size)]
        self._consumed += self.global_batch_size
        mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        samples = []
        for row, result in zip(mine, self.encoder.encode(mine), strict=True):
            if isinstance(result, str):
                raise DataError(f"{row.where}: {result}")
            # A sample left with nothing to train on is kept (masked): dropping it would shift every later one.
            samples.append(Sample(*truncate(result.ids, result.weights, self.max_length, self.truncation, self.counts)))
        return [
            self.collate(samples[start : start + micro_batch_size]) for start in range(0, per_rank, micro_batch_size)
        ]


def _shuffled(rows: Iterator[Row], size: int, rng: np.random.Generator) -> Iterator[Row]:
    """A seeded shuffle buffer: deterministic, so replaying the stream gives the same order."""
    buffer: list[Row] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    for index in rng.permutation(len(buffer)):
        yield buffer[index]
