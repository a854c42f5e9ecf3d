"""Preference pairs (train.task dpo / simpo / orpo / rm): ms-swift's rows, SFT templates, fitting, collation.

A row is a conversation in any chat format (formats.py) whose last message is the chosen assistant response,
plus the rejected one:
- `rejected_response`: a string replacing the content of the last assistant message, or
- `rejected_messages`: the whole rejected conversation (messages format).

Each side is rendered by the SFT template and masked by the SFT loss policy; with `data.loss_scale: default`
preference training scores the assistant turns after the last user turn (`last_round`: the response, as TRL's
prompt / completion split). A micro-batch of n pairs is one [2n, seq] batch, the n chosen rows first, then their
n rejected rows in the same order (TRL's concatenated forward), so a pair always goes through one forward. With
`data.packing` whole pairs are packed into rows (each side its own document), so a pair never spans micro-batches.
A reward model (rm) reads the same rows, plus an optional number `margin` (TRL's RewardTrainer), and scores each
whole side at its last token (`RewardPairCollate`; packed: `PackedRewardPairCollate`, each whole side a document).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_swift.data.encode import Encoder, Sample
from megatron_swift.data.errors import RowProblem
from megatron_swift.data.formats import normalise
from megatron_swift.data.labels import TruncationCounts, truncate
from megatron_swift.data.packing import PackedCollate, PaddedCollate
from megatron_swift.data.sources import Row

REJECTED_FIELDS = ("rejected_response", "rejected_messages")
PAIR_TASKS = ("dpo", "simpo", "orpo")  # the train.task values that train language models on pairs
RM_TASK = "rm"  # a reward model on the same pairs (training/reward.py)


@dataclass(frozen=True)
class PairSample:
    chosen: Sample
    rejected: Sample
    margin: float = 0.0  # rm: the row's `margin` (TRL's RewardTrainer), subtracted from the reward difference


def row_margin(data: dict) -> float:
    """A reward-model row's optional `margin` (a number; 0 when absent); RowProblem says what is wrong."""
    margin = data.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or margin != margin:
        raise RowProblem(f"'margin' must be a number, got {margin!r}")
    return float(margin)


def split_pair(data: dict, row_format: str = "auto") -> tuple[dict, dict]:
    """(chosen, rejected) as `messages` rows; RowProblem says what is wrong with the row."""
    given = [name for name in REJECTED_FIELDS if data.get(name) not in (None, "", [])]
    if len(given) != 1:
        raise RowProblem(
            "preference rows need exactly one of 'rejected_response' (a string) or 'rejected_messages' (a "
            f"conversation) next to the chosen conversation; found {given or 'neither'}"
        )
    chosen_fields = {key: value for key, value in data.items() if key not in REJECTED_FIELDS}
    chosen = normalise(chosen_fields, row_format)
    if isinstance(chosen, str):
        raise RowProblem("preference rows need a conversation (messages, ...), not 'text'")
    last = chosen.messages[-1]
    if last["role"] != "assistant":
        raise RowProblem("the chosen conversation must end with the assistant's response (its last message)")
    tools = {"tools": chosen.tools} if chosen.tools else {}
    if given[0] == "rejected_response":
        response = data["rejected_response"]
        if not isinstance(response, str):
            raise RowProblem(f"rejected_response must be a string, got {type(response).__name__}")
        rejected_messages = [*chosen.messages[:-1], {"role": "assistant", "content": response}]
    else:
        try:
            rejected = normalise({"messages": data["rejected_messages"], **tools}, "messages")
        except RowProblem as problem:
            raise RowProblem(f"rejected_messages: {problem}") from None
        if rejected.messages[-1]["role"] != "assistant":
            raise RowProblem("rejected_messages must end with the rejected assistant response")
        rejected_messages = rejected.messages
    return {"messages": chosen.messages, **tools}, {"messages": rejected_messages, **tools}


class PairEncoder:
    """Picklable, like Encoder (whose template, loss policy and tokenizer it uses for both sides)."""

    def __init__(self, encoder: Encoder, task: str = "dpo"):
        self.encoder = encoder
        # One task name for every language-model pair task: the samples (and their cache entries) are the same;
        # rm's carry the rows' margins.
        self.tokenizer, self.template = encoder.tokenizer, encoder.template
        self.task = RM_TASK if task == RM_TASK else "dpo"

    def encode(self, rows: Sequence[Row]) -> list[PairSample | str]:
        sides, results, margins = [], [], []
        for row in rows:
            try:
                chosen, rejected = split_pair(row.data, self.encoder.row_format)
                margins.append(row_margin(row.data) if self.task == RM_TASK else 0.0)
                sides += [Row(row.where, chosen), Row(row.where, rejected)]
                results.append(None)
            except RowProblem as problem:
                results.append(str(problem))
        margins = iter(margins)
        encoded = iter(self.encoder.encode(sides))
        for index, result in enumerate(results):
            if result is None:
                chosen, rejected = next(encoded), next(encoded)
                problems = [f"{name}: {side}" for name, side in (("chosen", chosen), ("rejected", rejected))
                            if isinstance(side, str)]  # fmt: skip
                margin = next(margins)
                results[index] = "; ".join(problems) if problems else PairSample(chosen, rejected, margin)
        return results


def fit_pairs(pairs: list[PairSample], max_length: int, strategy: str, stats: dict) -> list[PairSample]:
    """Both sides cut to max_length by the truncation strategy; a pair is dropped when either side is deleted or
    has nothing left to score."""
    counts, fitted = TruncationCounts(), []
    for pair in pairs:
        sides = []
        for sample in (pair.chosen, pair.rejected):
            kept = truncate(sample.ids, sample.weights, max_length, strategy, counts)
            if kept is None or not kept[1][1:].any():
                break
            sides.append(Sample(*kept))
        if len(sides) == 2:
            fitted.append(PairSample(*sides, pair.margin))
    stats |= {"truncated": counts.truncated, "deleted_too_long": counts.deleted,
              "no_target_after_truncation": counts.no_target, "trained_pairs": len(fitted)}  # fmt: skip
    return fitted


@dataclass(frozen=True)
class PairCollate:
    """n pairs -> tokens, labels, loss_mask, token_mask [2n, seq_length] (the chosen rows, then the rejected rows)
    and pair_weight [n].
    The loss mask is 0/1 (which tokens are scored): preference losses use each sequence's summed log-probability."""

    seq_length: int
    pad_id: int

    def __call__(self, pairs: list[PairSample]) -> dict[str, torch.Tensor]:
        rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
        batch = PaddedCollate(self.seq_length, self.pad_id)(rows)
        batch["loss_mask"] = (batch["loss_mask"] > 0).float()
        # Every predicted position of the sample, prompt included (ORPO's NLL term, as TRL's, covers them all).
        batch["token_mask"] = torch.zeros_like(batch["loss_mask"])
        for row, sample in enumerate(rows):
            batch["token_mask"][row, : len(sample.ids) - 1] = 1.0
        batch["pair_weight"] = torch.ones(len(pairs))  # 0 for the fillers of a last validation batch
        return batch


@dataclass(frozen=True)
class RewardPairCollate:
    """train.task rm: PairCollate's [2n, seq_length] rows holding whole samples (rm's max_length is at most
    seq_length: the reward is read at the sample's end), plus `reward_position` [2n], each row's last non-pad token
    (HF's rule, models/reward.py), and `margin` [n]."""

    seq_length: int
    pad_id: int

    def __call__(self, pairs: list[PairSample]) -> dict[str, torch.Tensor]:
        from megatron_swift.models.reward import last_non_pad_positions

        batch = PairCollate(self.seq_length, self.pad_id)(pairs)
        batch["reward_position"] = last_non_pad_positions(batch["tokens"], self.pad_id)
        batch["margin"] = torch.tensor([pair.margin for pair in pairs], dtype=torch.float64)
        return batch


def pair_positions(pair: PairSample, task: str = "dpo") -> int:
    """Positions a pair takes in a packed row: both sides' inputs (n - 1 tokens each; rm: the whole samples)."""
    whole = 2 if task == RM_TASK else 0
    return len(pair.chosen.ids) - 1 + len(pair.rejected.ids) - 1 + whole


@dataclass(frozen=True)
class PackedPairCollate:
    """Rows of whole pairs -> one packed micro-batch (THD, as packing.PackedCollate): each pair's chosen then rejected
    sequence as two documents, attention and rotary positions restarting at each; `document_pair` / `document_side`
    [documents] say which pair (micro-batch order; -1: a row's padding) and side (0 chosen, 1 rejected) each
    document of `cu_seqlens` holds."""

    seq_length: int
    pad_id: int

    def __call__(self, rows: list[list[PairSample]]) -> dict[str, torch.Tensor]:
        sides = [[sample for pair in row for sample in (pair.chosen, pair.rejected)] for row in rows]
        batch = PackedCollate(self.seq_length, self.pad_id)(sides)
        batch["loss_mask"] = (batch["loss_mask"] > 0).float()
        document_pair, document_side, pairs = [], [], 0
        for row in rows:
            for _ in row:
                document_pair += [pairs, pairs]
                document_side += [0, 1]
                pairs += 1
            if sum(pair_positions(pair) for pair in row) < self.seq_length:
                document_pair.append(-1)  # the row's padding: its own final segment
                document_side.append(0)
        batch["token_mask"] = torch.zeros_like(batch["loss_mask"])
        cu = batch["cu_seqlens"].tolist()
        for d, pair in enumerate(document_pair):
            if pair >= 0:
                row, start = divmod(cu[d], self.seq_length)
                batch["token_mask"][row, start : start + cu[d + 1] - cu[d]] = 1.0
        batch |= {"document_pair": torch.tensor(document_pair), "document_side": torch.tensor(document_side),
                  "pair_weight": torch.ones(pairs)}  # fmt: skip
        return batch


def _with_end(sample: Sample, pad_id: int) -> Sample:
    """The sample plus one pad token: a collate's inputs (ids[:-1]) are then the whole sample."""
    return Sample(np.append(sample.ids, pad_id).astype(sample.ids.dtype), np.append(sample.weights, 0.0))


@dataclass(frozen=True)
class PackedRewardPairCollate:
    """rm with data.packing: PackedPairCollate's rows of whole pairs, each side's whole sample a document, plus
    `reward_position` [2n] into the flattened rows (chosen sides, then rejected; HF's last non-pad token of each
    document) and `margin` [n]."""

    seq_length: int
    pad_id: int

    def __call__(self, rows: list[list[PairSample]]) -> dict[str, torch.Tensor]:
        from megatron_swift.models.reward import last_non_pad_positions

        ended = [[PairSample(_with_end(p.chosen, self.pad_id), _with_end(p.rejected, self.pad_id)) for p in row]
                 for row in rows]  # fmt: skip
        batch = PackedPairCollate(self.seq_length, self.pad_id)(ended)
        tokens, cu = batch["tokens"].reshape(-1), batch["cu_seqlens"].tolist()
        pairs = len(batch["pair_weight"])
        positions = torch.zeros(2 * pairs, dtype=torch.long)
        for d, (pair, side) in enumerate(zip(batch["document_pair"].tolist(), batch["document_side"].tolist(),
                                             strict=True)):  # fmt: skip
            if pair >= 0:
                positions[side * pairs + pair] = cu[d] + last_non_pad_positions(tokens[cu[d] : cu[d + 1]], self.pad_id)
        batch["reward_position"] = positions
        batch["margin"] = torch.tensor([pair.margin for row in rows for pair in row], dtype=torch.float64)
        return batch
