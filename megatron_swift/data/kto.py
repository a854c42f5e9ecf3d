"""KTO data (train.task kto): ms-swift's unpaired rows, the mismatched KL sequences, collation.

A row is a conversation in any chat format (formats.py) whose last message is the assistant's response, plus
`label`: true (a desirable response) or false (an undesirable one). It is rendered and masked like SFT, scoring the
turns after the last user turn (the response, as TRL's prompt / completion split): the prompt is everything before
the first scored token, the completion the span from there to the last scored token.

KTO's KL term is estimated from mismatched (prompt, completion) sequences, built as TRL's KTOTrainer builds them: the
items, in dataset order, are cut into consecutive chunks of `global_batch_size` and each item's completion moves to
the next item of its chunk, the last one's to the first ((x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1), ...,
(xn, yn-1)). The pairing is fixed with the item (as TRL's, done once before its sequential sampler; ms-swift does
it once on the shuffled data), so it is the same at every parallel layout, and precomputed reference log-probs
hold for it. Unshuffled (`data.shuffle: false`) each global batch's KL sequences are its own completions with
other prompts, TRL's recommended set; shuffled, each item keeps its fixed mismatched completion. A last chunk of one
item joins the chunk before it. With packing the chunks are still of `global_batch_size` items, made before the
items are packed into rows (a global batch of rows then holds other items' KL completions too). A KL sequence is
cut to `max_length` keeping its start (TRL's collator).

A micro-batch of n items is one [2n, seq] batch: the n completions, then their n KL sequences (the layout of
preference pairs, data/pairs.py, so the reference's forward and precomputed log-probs are shared with DPO). With
`data.packing` whole items are packed into rows (`item_positions`: both the completion and the KL sequence fit);
a packed micro-batch of r rows is [2r, seq]: the r rows of completions, then the r rows of the same items' KL
sequences, each sequence its own document (`PackedKtoCollate`, the layout of packed pairs with the completion as
side 0 and the KL sequence as side 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_swift.data.encode import Encoder, Sample
from megatron_swift.data.errors import RowProblem
from megatron_swift.data.formats import normalise
from megatron_swift.data.packing import PackedCollate, PaddedCollate
from megatron_swift.data.sources import Row

KTO_TASK = "kto"


@dataclass(frozen=True)
class LabelledSample:
    """An encoded KTO row: the conversation and whether its response is desirable."""

    sample: Sample
    desirable: bool


@dataclass(frozen=True)
class KtoSample:
    completion: Sample  # the row's prompt and response
    kl: Sample  # the row's prompt with another item's response (only its response is scored)
    desirable: bool


def row_label(data: dict) -> bool:
    """The row's `label` (true / false, or 1 / 0); RowProblem says what is wrong."""
    for name in ("rejected_response", "rejected_messages"):
        if data.get(name) not in (None, "", []):
            raise RowProblem(f"KTO rows are unpaired (a conversation and its 'label'); found {name!r}: use "
                             "train.task dpo for pairs, or split each pair into a true and a false row")  # fmt: skip
    if "label" not in data:
        raise RowProblem("KTO rows need 'label': true (a desirable response) or false (an undesirable one)")
    label = data["label"]
    if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
        return bool(label)
    raise RowProblem(f"'label' must be true or false, got {label!r}")


class KtoEncoder:
    """Picklable, like Encoder (whose template, loss policy and tokenizer it uses)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.tokenizer, self.template, self.task = encoder.tokenizer, encoder.template, KTO_TASK

    def encode(self, rows: Sequence[Row]) -> list[LabelledSample | str]:
        labels, conversations = [], []
        for row in rows:
            try:
                label = row_label(row.data)
                data = {key: value for key, value in row.data.items() if key != "label"}
                conversation = normalise(data, self.encoder.row_format)
                if isinstance(conversation, str):
                    raise RowProblem("KTO rows need a conversation (messages, ...), not 'text'")
                if conversation.messages[-1]["role"] != "assistant":
                    raise RowProblem("the conversation must end with the assistant's response (its last message)")
                conversations.append(Row(row.where, data))
                labels.append(label)
            except RowProblem as problem:
                labels.append(str(problem))
        encoded = iter(self.encoder.encode(conversations))
        results = []
        for label in labels:
            if isinstance(label, str):
                results.append(label)
                continue
            sample = next(encoded)
            results.append(sample if isinstance(sample, str) else LabelledSample(sample, label))
        return results


def completion_span(sample: Sample) -> tuple[int, int]:
    """[first, last + 1) of the scored tokens (weights[0] is never a target)."""
    scored = np.flatnonzero(sample.weights[1:] > 0) + 1
    return int(scored[0]), int(scored[-1]) + 1


def kl_sample(prompt_of: Sample, completion_of: Sample, max_length: int) -> Sample:
    """`prompt_of`'s prompt followed by `completion_of`'s completion (scored as in `completion_of`), cut to
    max_length tokens keeping the start."""
    prompt_end = completion_span(prompt_of)[0]
    first, end = completion_span(completion_of)
    ids = np.concatenate([prompt_of.ids[:prompt_end], completion_of.ids[first:end]])[:max_length]
    weights = np.concatenate([np.zeros(prompt_end, np.float32), completion_of.weights[first:end]])[:max_length]
    return Sample(ids.astype(prompt_of.ids.dtype), weights.astype(np.float32))


def with_kl_sequences(items: list[LabelledSample], chunk: int, max_length: int) -> list[KtoSample]:
    """Each item with its KL sequence: completions rotated by one within consecutive chunks of `chunk` items."""
    bounds = [*range(0, len(items), chunk), len(items)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:  # a last chunk of one item joins the one before
        del bounds[-2]
    found = []
    for start, end in itertools.pairwise(bounds):
        group = items[start:end]
        for index, item in enumerate(group):
            other = group[index - 1]  # index 0 takes the chunk's last completion
            found.append(KtoSample(item.sample, kl_sample(item.sample, other.sample, max_length), item.desirable))
    return found


@dataclass(frozen=True)
class KtoCollate:
    """n items -> tokens, labels, loss_mask [2n, seq_length] (the completions, then their KL sequences), `desirable`
    [n] (1 or 0) and `pair_weight` [n] (1; 0 for the fillers of a last validation batch: the name preference pairs
    use, an item being a pair of sequences here too)."""

    seq_length: int
    pad_id: int

    def __call__(self, items: list[KtoSample]) -> dict[str, torch.Tensor]:
        batch = PaddedCollate(self.seq_length, self.pad_id)([i.completion for i in items] + [i.kl for i in items])
        batch["loss_mask"] = (batch["loss_mask"] > 0).float()
        batch["desirable"] = torch.tensor([float(item.desirable) for item in items])
        batch["pair_weight"] = torch.ones(len(items))
        return batch


def item_positions(item: KtoSample) -> int:
    """Positions an item takes in a packed row: the longer of its completion's and its KL sequence's inputs (both
    halves of a packed micro-batch hold the same items, one row each)."""
    return max(len(item.completion.ids), len(item.kl.ids)) - 1


@dataclass(frozen=True)
class PackedKtoCollate:
    """Rows of whole items -> one packed micro-batch (THD, as packing.PackedCollate) of 2r rows: the items'
    completions in rows 0..r-1, their KL sequences in rows r..2r-1, each a document; `document_pair` / `document_side`
    [documents] say which item (micro-batch order; -1: a row's padding) and which sequence (0: completion, 1: KL)
    each document of `cu_seqlens` holds (pairs.PackedPairCollate's fields); `desirable` and `pair_weight` [n] as
    KtoCollate's."""

    seq_length: int
    pad_id: int

    def __call__(self, rows: list[list[KtoSample]]) -> dict[str, torch.Tensor]:
        halves = [[item.completion for item in row] for row in rows] + [[item.kl for item in row] for row in rows]
        batch = PackedCollate(self.seq_length, self.pad_id)(halves)
        batch["loss_mask"] = (batch["loss_mask"] > 0).float()
        document_pair, document_side = [], []
        for side, half in enumerate((halves[: len(rows)], halves[len(rows) :])):
            items = 0
            for row in half:
                document_pair += range(items, items + len(row))
                document_side += [side] * len(row)
                items += len(row)
                if sum(len(sample.ids) - 1 for sample in row) < self.seq_length:
                    document_pair.append(-1)  # the row's padding: its own final segment
                    document_side.append(0)
        items = [item for row in rows for item in row]
        batch |= {"document_pair": torch.tensor(document_pair), "document_side": torch.tensor(document_side),
                  "desirable": torch.tensor([float(item.desirable) for item in items]),
                  "pair_weight": torch.ones(len(items))}  # fmt: skip
        return batch
