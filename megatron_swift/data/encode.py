"""Rows -> token ids + per-token loss weights, in batches, optionally across worker processes.

A conversation is rendered by its template into role-tagged segments; the whole text is tokenized
at once (exactly what `apply_chat_template` tokenizes), and each token takes the weight of the
segment its first character belongs to. Pretraining text is tokenized and ended with EOS.
Workers get the rows in fixed chunks and results come back in order, so N workers give exactly
the output of one.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from megatron_swift.data.errors import RowProblem
from megatron_swift.data.formats import Conversation, normalise
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import Row

CHUNK_ROWS = 2048  # rows per encode_batch call (the Rust tokenizer parallelises inside a call)


@dataclass(frozen=True)
class Sample:
    ids: np.ndarray  # int32 token ids
    weights: np.ndarray  # float32 loss weight of predicting each token (weights[0] unused)


class Encoder:
    """Picklable: holds the tokenizer, the template, the loss policy and the row format."""

    def __init__(self, tokenizer, template, policy: LossPolicy, row_format: str = "auto", task: str = "sft"):
        self.tokenizer, self.template, self.policy = tokenizer, template, policy
        self.row_format, self.task = row_format, task
        self.eos_id = tokenizer.eos_token_id

    def check(self, row: Row) -> Conversation | str:
        """The row normalised, or RowProblem; cheap (no tokenization)."""
        if row.data.get("images") or row.data.get("videos"):
            raise RowProblem("the row has images or videos but the model is text-only (its directory has no image "
                             "processor); train a vision-language model, or drop the row's media")  # fmt: skip
        item = normalise(row.data, self.row_format)
        if self.task == "pretrain" and not isinstance(item, str):
            raise RowProblem("pretraining rows need a string field 'text'")
        if self.task == "sft" and isinstance(item, str):
            raise RowProblem("SFT rows need a conversation (messages, conversations, instruction/output or "
                             "query/response); 'text' rows are for train.task=pretrain")  # fmt: skip
        return item

    def encode(self, rows: Sequence[Row]) -> list[Sample | str]:
        """One Sample per row, or what is wrong with the row (a message, without its location)."""
        texts, plans, results = [], [], []
        for row in rows:
            try:
                item = self.check(row)
                if isinstance(item, str):
                    plans.append(None)
                    texts.append(item)
                else:
                    segments = self.template.segments(item)
                    weights = self.policy.segment_weights(segments)
                    if not any(weights):
                        raise RowProblem("no token to train on (every turn is masked by the loss policy)")
                    plans.append((segments, weights))
                    texts.append("".join(s.text for s in segments))
                results.append(None)
            except RowProblem as problem:
                results.append(str(problem))
        encodings = iter(self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
        plans = iter(plans)
        for index, result in enumerate(results):
            if result is None:
                results[index] = self._sample(next(encodings), next(plans))
        return results

    def _sample(self, encoding, plan) -> Sample:
        ids = np.asarray(encoding.ids, dtype=np.int32)
        if plan is None:
            return Sample(np.append(ids, np.int32(self.eos_id)), np.ones(len(ids) + 1, dtype=np.float32))
        return Sample(ids, token_weights(encoding, *plan))


def token_weights(encoding, segments: Sequence, segment_weights: Sequence[float]) -> np.ndarray:
    """Each token's weight: that of the segment its first character belongs to (segments concatenate to the text)."""
    starts, position = [], 0
    for segment in segments:
        starts.append(_first_token(encoding, position, len(segment.text)))
        position += len(segment.text)
    following = len(encoding.ids)
    for index in reversed(range(len(starts))):  # a segment without a token of its own starts where the next does
        if starts[index] is None:
            starts[index] = following
        following = starts[index]
    counts = np.diff(np.asarray([*starts, len(encoding.ids)]))
    return np.repeat(np.asarray(segment_weights, dtype=np.float32), counts)


def _first_token(encoding, start: int, length: int) -> int | None:
    """The first token that starts inside characters [start, start + length), or None.

    A token spanning the boundary belongs to the segment it starts in; characters no token covers
    (a normalizer may drop some) are skipped.
    """
    for position in range(start, start + length):
        token = encoding.char_to_token(position)
        if token is not None:
            return token + 1 if encoding.token_to_chars(token)[0] < start else token
    return None


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(rows: list[Row]) -> list[Sample | str]:
    return _worker_encoder.encode(rows)


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_rows(
    encoder: Encoder,
    rows: Iterable[Row],
    workers: int = 1,
    progress: bool = False,
    total: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[Row, Sample | str]]:
    """(row, sample or problem) for every row, in row order, with `workers` processes (1: in this process)."""
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, desc="tokenize", unit="rows", disable=not progress))
        sent: collections.deque[list[Row]] = collections.deque()  # chunks in the order they were handed out

        def feed() -> Iterator[list[Row]]:  # the pool's feeder thread pulls from this
            for chunk in _chunks(rows, chunk_rows):
                sent.append(chunk)
                yield chunk

        if workers <= 1:
            results = map(encoder.encode, feed())
        else:
            # spawn, not fork: forking a process that already runs threads (the Rust tokenizer's pool, torch,
            # process groups) can deadlock the child on a lock some other thread held at fork time.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(workers, _init_worker, (encoder,)))
            results = pool.imap(_encode_in_worker, feed())
        for result in results:
            chunk = sent.popleft()
            bar.update(len(chunk))
            yield from zip(chunk, result, strict=True)
