"""KTO (train.task kto): TRL's KTOTrainer loss on unpaired, labelled completions; one step.

A micro-batch of n items is [2n, seq]: the n completions, then their n mismatched KL sequences (data/kto.py; packed:
r rows of completions, then r rows of the same items' KL sequences, each sequence a document, so each pass below
runs only its half and log-probs are summed per document). Each step, as TRL's `_compute_loss`:
1. the reference's log-probs of all 2n rows (preference.ReferenceModel: LoRA adapters off, a frozen copy,
   `rlhf.ref_model`, or precomputed and carried with the items), through megatron-core's forward-only schedule;
2. the policy's log-probs of the KL rows, forward-only and without gradient (TRL computes them under no_grad);
3. the KL estimate `kl = max(0, mean(policy KL logps - reference KL logps))`, detached;
4. the training schedule over the completions only: per item
   `desirable_weight * (1 - sigmoid(beta * (logratio - kl)))` for a desirable completion,
   `undesirable_weight * (1 - sigmoid(beta * (kl - logratio)))` for an undesirable one (loss_type `kto`), or APO-zero's
   unpaired form without the KL (`apo_zero_unpaired`: `1 - sigmoid(beta * logratio)` / `sigmoid(beta * logratio)`),
   where logratio = policy - reference log-prob of the completion (summed over its scored tokens).

The KL reduction: TRL takes the mean over its per-device batch, then the mean of those over the processes
(`gather_for_metrics(kl).mean()`), once per accumulation step. Here the mean is over the whole global batch (every
micro-batch of every data-parallel rank, the fillers of a validation batch left out), computed once per step before
the training schedule, so it is the same at every layout. It equals TRL's when TRL takes the global batch in one
accumulation step (one process with per_device_train_batch_size = the global batch, or DP ranks with equal shares).

The schedule's loss is the micro-batch's sum of weighted per-item losses with the item count as megatron-core's
token count (`calculate_per_token_loss`), so the step is the mean over the global batch's items (TRL: `nanmean` of
the weighted losses) whatever the split. Metrics are TRL's: `rewards/chosen` and `logps/chosen` are means over the
desirable items, `.../rejected` over the undesirable ones (absent when there are none), `rewards/margins` their
difference, and `kl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_swift.training.optim import current_lr
from megatron_swift.training.preference import ReferenceModel, global_report, model_output, pair_sums
from megatron_swift.training.step import StepResult, run_forward_backward

# Reported per micro-batch (sums over its items) and summed over the global batch.
REPORT = ("loss", "items", "desirable", "undesirable", "rewards/chosen", "rewards/rejected", "logps/chosen",
          "logps/rejected")  # fmt: skip


@dataclass(frozen=True)
class KtoLoss:
    """TRL's KTOTrainer loss (`loss_type` kto or apo_zero_unpaired) with its per-class weights."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"

    @classmethod
    def from_section(cls, rlhf) -> KtoLoss:
        (loss_type,) = rlhf.loss_type or ["kto"]
        return cls(rlhf.beta, rlhf.desirable_weight, rlhf.undesirable_weight, loss_type)

    def per_item(self, logps, ref_logps, kl, desirable):
        """(weighted loss [n], reward [n]) of each completion; `desirable` is 1 / 0 per item; TRL's formulas."""
        logratios = logps - ref_logps
        if self.uses_kl:
            chosen = 1 - torch.sigmoid(self.beta * (logratios - kl))
            rejected = 1 - torch.sigmoid(self.beta * (kl - logratios))
        else:
            chosen, rejected = 1 - torch.sigmoid(self.beta * logratios), torch.sigmoid(self.beta * logratios)
        desirable = desirable.bool()
        loss = torch.where(desirable, self.desirable_weight * chosen, self.undesirable_weight * rejected)
        return loss, self.beta * logratios


def _rows(batch: dict, second_half: bool) -> dict:
    """The completions (first half) or the KL sequences (second half) of a [2n, seq] micro-batch, with the per-item
    fields; `ref_logps` [2n] split the same way. Packed ([2r, seq], data/kto.py): the half's r rows and the
    documents in them (each row ends on a document boundary), every one side 0 (an item's only sequence there)."""
    n = len(batch["pair_weight"])
    out = {key: batch[key] for key in ("desirable", "pair_weight")}
    if "ref_logps" in batch:
        out["ref_logps"] = batch["ref_logps"][n:] if second_half else batch["ref_logps"][:n]
    if "cu_seqlens" not in batch:
        rows = slice(n, 2 * n) if second_half else slice(0, n)
        return out | {key: batch[key][rows] for key in ("tokens", "labels", "loss_mask")}
    rows, seq_length = batch["tokens"].shape[0] // 2, batch["tokens"].shape[1]
    cu_seqlens, boundary = batch["cu_seqlens"], rows * seq_length
    split = int((cu_seqlens == boundary).nonzero()[0])  # documents before the KL rows
    half, documents = (slice(rows, 2 * rows), slice(split, None)) if second_half else (slice(0, rows), slice(0, split))
    out |= {key: batch[key][half] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    out["cu_seqlens"] = cu_seqlens[split:] - boundary if second_half else cu_seqlens[: split + 1]
    out["document_pair"] = batch["document_pair"][documents]
    out["document_side"] = torch.zeros_like(out["document_pair"])
    return out


def _sequence_logps(per_token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each item's log-prob, summed in float64 (as preference.pair_sums, which sums packed documents per item)."""
    if "cu_seqlens" in batch:
        return pair_sums(per_token_loss, batch).chosen
    return -(per_token_loss.double() * batch["loss_mask"].double()).sum(dim=1)


def _kl_func(batch: dict, per_token_loss):
    """Forward-only: sums over the micro-batch's real items of (policy - reference) KL log-probs, and their count."""
    weight = batch["pair_weight"].double().to(per_token_loss.device)
    ratio = _sequence_logps(per_token_loss, batch) - batch["ref_logps"].to(per_token_loss.device)
    report = torch.stack([(ratio * weight).sum(), weight.sum()]).detach().double()
    return torch.zeros((), device=report.device), torch.tensor(0, dtype=torch.int), {"kl": report}


def _loss_func(loss: KtoLoss, kl: float, batch: dict, per_token_loss):
    logps = _sequence_logps(per_token_loss, batch)
    device = logps.device
    desirable, weight = batch["desirable"].double().to(device), batch["pair_weight"].double().to(device)
    per_item, rewards = loss.per_item(logps, batch["ref_logps"].to(device), kl, desirable)
    total = (per_item * weight).sum()
    chosen, rejected = desirable * weight, (1 - desirable) * weight
    rewards, logps = rewards.detach(), logps.detach()
    report = torch.stack([total.detach(), weight.sum(), chosen.sum(), rejected.sum(), (rewards * chosen).sum(),
                          (rewards * rejected).sum(), (logps * chosen).sum(), (logps * rejected).sum()])  # fmt: skip
    return total, weight.sum().to(torch.int), {"kto": report.double()}


def _forward_step(data_iterator, model, loss_func):
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    return model_output(model, batch), partial(loss_func, batch)


def kto_metrics(total: torch.Tensor, kl: float) -> dict[str, float]:
    """TRL's KTO metrics from REPORT's global sums: per-class means, present only when the class is."""
    values = dict(zip(REPORT, total.tolist(), strict=True))
    metrics = {"loss": values["loss"] / max(values["items"], 1.0), "kl": kl}
    for side, count in (("chosen", "desirable"), ("rejected", "undesirable")):
        if values[count] > 0:
            metrics[f"rewards/{side}"] = values[f"rewards/{side}"] / values[count]
            metrics[f"logps/{side}"] = values[f"logps/{side}"] / values[count]
    if values["desirable"] > 0 and values["undesirable"] > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


@dataclass
class Kto:
    """What a KTO step needs besides the model: the loss and the reference."""

    loss: KtoLoss
    reference: ReferenceModel

    def kl(self, chunks, microbatches: list[dict]) -> float:
        """The global batch's KL estimate (module doc): the policy's KL rows forward-only, no gradient. Collective."""
        from megatron_swift.training.optim import parameters_synced

        if not self.loss.uses_kl:
            return 0.0
        kl_rows = [_rows(mb, second_half=True) for mb in microbatches]
        with torch.no_grad(), parameters_synced(chunks):
            reports = run_forward_backward(chunks, kl_rows, partial(_forward_step, loss_func=_kl_func), True)
        ratio_sum, items = global_report(reports, "kl", 2).tolist()
        return max(ratio_sum / max(items, 1.0), 0.0)

    def run(self, chunks, microbatches: list[dict], forward_only: bool) -> tuple[list[dict], float]:
        """The reference's log-probs, the KL estimate, then the policy's forward (and backward) over the completions
        of this rank's micro-batches of one global batch: (per-micro-batch reports on the last stage, kl)."""
        self.reference.attach_logps(microbatches)
        kl = self.kl(chunks, microbatches)
        completions = [_rows(mb, second_half=False) for mb in microbatches]
        forward_step = partial(_forward_step, loss_func=partial(_loss_func, self.loss, kl))
        return run_forward_backward(chunks, completions, forward_step, forward_only), kl

    def validate(self, chunks, microbatch_groups) -> dict[str, float]:
        """Loss and metrics over the validation items (`val_` + the training names; `val_kl` is the mean of the
        validation batches' KL estimates). Collective."""
        from megatron_swift.training.optim import parameters_synced

        total, kls = torch.zeros(len(REPORT), dtype=torch.float64), []
        with torch.no_grad(), parameters_synced(chunks):
            for chunk in chunks:
                chunk.eval()
            for microbatches in microbatch_groups:
                reports, kl = self.run(chunks, microbatches, forward_only=True)
                total += global_report(reports, "kto", len(REPORT))
                kls.append(kl)
        for chunk in chunks:
            chunk.train()
        return {f"val_{name}": value for name, value in kto_metrics(total, sum(kls) / max(len(kls), 1)).items()}

    def train_step(self, chunks, optimizer, scheduler, microbatches: list[dict], vocab_size: int) -> StepResult:
        from megatron_swift.training.moe_metrics import router_losses

        for chunk in chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports, kl = self.run(chunks, microbatches, forward_only=False)
        lr = current_lr(optimizer)
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
        total = global_report(reports, "kto", len(REPORT))
        metrics = kto_metrics(total, kl)
        loss = metrics.pop("loss")
        router = router_losses(chunks[0].config, len(microbatches))
        return StepResult(loss, int(total[1]), float(grad_norm or 0.0), lr, not updated, router, metrics)
