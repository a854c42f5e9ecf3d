"""Minimal data path for training: JSONL pretraining text and chat SFT, fixed-length samples.

Pretraining rows are `{"text": ...}`: documents are joined with EOS and cut into windows of
`seq_length + 1` tokens. SFT rows are `{"messages": [...]}` (OpenAI style): rendered with the
tokenizer's chat template, loss on assistant tokens only. The full data pipeline (formats, packing,
streaming, indexed data) replaces this module; its interface is `build_samples` + `GlobalBatches`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Sample:
    tokens: torch.Tensor  # [seq_length + 1] int64
    loss_mask: torch.Tensor  # [seq_length + 1] float, 1 where the token is a training target


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-empty line; a malformed line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _pretrain_samples(path: Path, rows, tokenizer, seq_length: int) -> list[Sample]:
    stream: list[int] = []
    for number, row in rows:
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{number}: pretraining rows need a string field 'text'")
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    window = seq_length + 1
    if len(stream) < window:
        raise DataError(f"{path}: {len(stream)} tokens in all, fewer than one sample of seq_length + 1 = {window}")
    tokens = torch.tensor(stream[: len(stream) // window * window]).view(-1, window)
    return [Sample(t, torch.ones(window)) for t in tokens]


def _render(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _sft_sample(path: Path, number: int, messages, tokenizer, seq_length: int) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}:{number}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{path}:{number}: messages[{i}] needs a role of system/user/assistant/tool")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{path}:{number}: messages[{i}].content must be a string")
    ids = _render(tokenizer, messages)
    mask = [0.0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_render(tokenizer, messages[: i + 1]))
            mask[start:end] = [1.0] * (end - start)
    if not any(mask):
        raise DataError(f"{path}:{number}: no assistant turn, so no token to train on")
    window = seq_length + 1
    ids, mask = ids[:window], mask[:window]
    pad = window - len(ids)
    return Sample(
        torch.tensor(ids + [tokenizer.pad_token_id] * pad), torch.tensor(mask + [0.0] * pad, dtype=torch.float)
    )


def build_samples(path: str | Path, tokenizer, seq_length: int, task: str) -> list[Sample]:
    rows = read_jsonl(path)
    if task == "pretrain":
        return _pretrain_samples(Path(path), rows, tokenizer, seq_length)
    samples = []
    for number, row in rows:
        if "messages" not in row:
            raise DataError(f"{path}:{number}: SFT rows need a 'messages' list")
        samples.append(_sft_sample(Path(path), number, row["messages"], tokenizer, seq_length))
    return samples


class GlobalBatches:
    """Deterministic global batches over epochs, resumable from a count of consumed samples.

    Every data-parallel rank sees the same order and takes its own contiguous slice of each global
    batch, so the union over ranks is the same whatever the DP size (what makes DP2 equal DP1).
    """

    def __init__(self, samples: list[Sample], global_batch_size: int, seed: int, shuffle: bool = True):
        self.samples, self.global_batch_size, self.seed, self.shuffle = samples, global_batch_size, seed, shuffle
        self.consumed_samples = 0

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if not self.shuffle:
            return offset
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(order[offset])

    def next_microbatches(self, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch: tokens, labels, loss_mask [mbs, seq]."""
        per_rank = self.global_batch_size // dp_size
        first = self.consumed_samples + dp_rank * per_rank
        picked = [self.samples[self._index(first + i)] for i in range(per_rank)]
        self.consumed_samples += self.global_batch_size
        batches = []
        for start in range(0, per_rank, micro_batch_size):
            group = picked[start : start + micro_batch_size]
            tokens = torch.stack([s.tokens for s in group])
            mask = torch.stack([s.loss_mask for s in group])
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask[:, 1:]})
        return batches
