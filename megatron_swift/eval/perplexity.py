"""Mean loss and perplexity of a model on a dataset, with training's templates and loss masks.

`encode_rows` is the one place where evaluation turns data rows into (token ids, loss mask); it goes
through the training data path, so a change there (templates, masking) reaches evaluation too. The
loss is the token mean over the whole dataset of the next-token cross entropy where the mask is 1,
exactly the training objective, and perplexity is exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_swift.data.encode import Sample
from megatron_swift.data.errors import BadRowError, BadRows
from megatron_swift.data.packing import PaddedCollate


def encode_rows(path: str | Path, tokenizer, seq_length: int, task: str = "sft", bad: BadRows | None = None
                ) -> list[Sample]:  # fmt: skip
    """Rows of a dataset -> samples of token ids and loss weights, exactly as training builds them (unshuffled).

    A bad row raises DataError; with `bad`, the error names `bad.option`, and with `bad.skip` bad rows
    are skipped and added to `bad` (count and first examples) as training's `data.skip_bad_rows` does.
    """
    from megatron_swift.data import build_train_data
    from megatron_swift.training.config import DataSection

    skip = bad is not None and bad.skip
    data = DataSection(dataset=[str(path)], seq_length=seq_length, shuffle=False, skip_bad_rows=skip)
    try:
        train_data = build_train_data(data, tokenizer, task, 1, 0)
    except BadRowError as exc:
        if bad is None:
            raise
        raise BadRowError(exc.where, exc.problem, bad.option) from None  # the caller's option, not training's
    if bad is not None:  # the pipeline counted them in its own BadRows
        bad.count += train_data.stats["bad_rows"]
        bad.examples += train_data.stats.get("bad_examples", [])
    items = train_data.batches.items
    return [items[i] for i in range(len(items))]


@torch.no_grad()
def masked_loss(model, samples: list[Sample], batch_size: int = 8) -> dict:
    """Token-mean masked next-token loss of `model` over `samples` (training's shift: predict tokens[1:])."""
    device = next(model.parameters()).device
    nll_sum = torch.zeros((), dtype=torch.float64)
    tokens_counted = 0
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        batch = PaddedCollate(max(len(s.ids) for s in group) - 1, pad_id=0)(group)
        inputs, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        # Samples are right-padded with mask 0; causal attention makes every position independent of
        # what follows it, so dropping the columns after the last target changes no loss term.
        targets = mask.any(dim=0).nonzero()
        if len(targets) == 0:
            continue
        width = int(targets[-1]) + 1
        inputs, labels, mask = inputs[:, :width], labels[:, :width], mask[:, :width]
        logits = model(input_ids=inputs.to(device)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.to(device), reduction="none")
        nll_sum += (nll.double() * mask.to(device).double()).sum().cpu()
        tokens_counted += int(mask.sum())
    if tokens_counted == 0:
        raise ValueError("no target tokens in the data (every loss mask is 0)")
    loss = float(nll_sum / tokens_counted)
    return {"loss": loss, "perplexity": math.exp(loss), "target_tokens": tokens_counted, "samples": len(samples)}
