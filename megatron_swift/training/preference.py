"""Preference training (train.task dpo / simpo / orpo): sequence log-probs, the reference, the losses, one step.

Log-probs come from the SFT loss path: the last stage asks megatron-core for the per-token cross entropy of the
labels (`labels=`, vocab-parallel over TP, padding columns masked by models/gpt.py), so a sequence's log-prob is
minus its masked sum and no [tokens, vocab] logits are gathered over tensor-parallel ranks. A micro-batch of n
pairs is [2n, seq]: n chosen rows, then their n rejected rows (data/pairs.py).

Each step first runs the reference model over the step's micro-batches through megatron-core's forward-only
schedule (so pipeline parallelism needs nothing of ours) and keeps the per-sequence log-probs with the
micro-batches; then the training schedule computes the policy's and the loss. The reference is:
- LoRA: the same chunks with their adapters switched off (`adapters_disabled`), no second copy;
- full training: a frozen copy of the initial weights at the same parallel layout (`ReferenceModel.copy`);
- `rlhf.reference_free`: none (its log-probs are 0);
- `rlhf.precompute_ref_logps`: one of the above over the whole data before training, kept with the items
  (`precompute_reference_logps`; a frozen copy is then dropped).

Losses are TRL's (`DPOTrainer`, per pair, summed over `loss_type` with `loss_weights`); `sigmoid` with
`label_smoothing` is cDPO (TRL < 1.0, ms-swift). SimPO (TRL's CPOTrainer, loss_type simpo) and ORPO (ORPOTrainer)
have no reference and use each sequence's log-prob averaged over its scored tokens. The schedule's loss is the
micro-batch's sum of per-pair losses with the pair count as megatron-core's token count
(`calculate_per_token_loss`), so the step's gradient is the exact mean over the global batch's pairs whatever the
split. The NLL term (DPO's `rpo_alpha`, SimPO's `cpo_alpha`, ORPO's own) is a token mean over the global batch's
chosen responses: its per-micro-batch sum is scaled by the global batch's pairs / chosen tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_swift.distributed.runtime import comm_device
from megatron_swift.training.optim import current_lr
from megatron_swift.training.step import StepResult, run_forward_backward

# Reported per micro-batch (sums over its pairs) and summed over the global batch.
REPORT = ("loss", "pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected")  # fmt: skip


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (two branches at -ln 2, as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True)
class PreferenceLoss:
    """One task's per-pair loss: `dpo` (TRL's DPOTrainer), `simpo` (CPOTrainer's loss_type simpo), `orpo`
    (ORPOTrainer). SimPO and ORPO need no reference and use length-averaged log-probs."""

    task: str = "dpo"
    beta: float = 0.1
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    label_smoothing: float = 0.0
    nll_weight: float = 0.0  # NLL of the chosen responses: rpo_alpha (dpo), cpo_alpha (simpo), 1 (orpo)
    simpo_gamma: float = 0.5

    @property
    def nll_over_whole_sequence(self) -> bool:
        """ORPO's NLL term covers the chosen sequence's prompt too (TRL's ORPOTrainer); the others the response."""
        return self.task == "orpo"

    @classmethod
    def from_section(cls, task: str, rlhf) -> PreferenceLoss:
        loss_types = rlhf.loss_type or ["sigmoid"]  # null: DPO's default
        weights = rlhf.loss_weights if rlhf.loss_weights is not None else [1.0] * len(loss_types)
        nll = {"dpo": rlhf.rpo_alpha or 0.0, "simpo": 1.0 if rlhf.cpo_alpha is None else rlhf.cpo_alpha, "orpo": 1.0}
        gamma = 0.5 if rlhf.simpo_gamma is None else rlhf.simpo_gamma
        return cls(task, rlhf.beta, tuple(loss_types), tuple(weights), rlhf.label_smoothing, nll[task], gamma)

    def per_pair(self, chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens):
        """(loss [n] without the NLL term, chosen rewards, rejected rewards, chosen logps, rejected logps as
        reported: averaged per token for simpo / orpo); TRL's formulas."""
        if self.task != "dpo":
            chosen_avg, rejected_avg = (
                chosen_logps / chosen_tokens.clamp(min=1),
                rejected_logps / rejected_tokens.clamp(min=1),
            )
            if self.task == "simpo":
                logits = self.beta * ((chosen_avg - rejected_avg) - self.simpo_gamma / self.beta)
                eps = self.label_smoothing
                loss = -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps
            else:  # orpo: the log odds ratio of chosen over rejected
                log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
                loss = -self.beta * F.logsigmoid(log_odds)
            return loss, self.beta * chosen_avg, self.beta * rejected_avg, chosen_avg, rejected_avg
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        logits = self.beta * (chosen_ratio - rejected_ratio)
        eps = self.label_smoothing
        total = torch.zeros_like(logits)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":  # DPO; cDPO with label smoothing
                loss = -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps
            elif loss_type == "hinge":  # SLiC
                loss = torch.relu(1 - logits)
            elif loss_type == "ipo":  # log-ratios averaged per completion token, as TRL (confirmed by the authors)
                delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
                loss = (delta - 1 / (2 * self.beta)) ** 2
            elif loss_type == "robust":
                loss = (-F.logsigmoid(logits) * (1 - eps) + F.logsigmoid(-logits) * eps) / (1 - 2 * eps)
            else:  # preflight (rlhf_config.py) admits only the types above
                raise ValueError(f"rlhf.loss_type {loss_type!r} is not built")
            total = total + weight * loss
        return total, self.beta * chosen_ratio, self.beta * rejected_ratio, chosen_logps, rejected_logps


@dataclass(frozen=True)
class PairSums:
    """Per-pair sums [n] of one micro-batch: log-probs and scored tokens of each side, and the chosen sequence's
    NLL and token count under the NLL term's mask (the response, or the whole sequence for ORPO)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_nll: torch.Tensor


def pair_sums(per_token_loss: torch.Tensor, batch: dict, nll_mask: str = "loss_mask") -> PairSums:
    """From the model's per-token cross entropy: [2n, s] rows (chosen rows first), or one packed row [1, T] whose
    documents `document_pair` / `document_side` place (data/pairs.py)."""
    # Summed in float64: a sum of ~-100 carries fp32 ulps of ~8e-6 by itself, which differences of sums (rewards,
    # KTO's KL) and other summation orders (layouts) would show.
    per_token = per_token_loss.double()
    masks = {name: batch[name].double() for name in {"loss_mask", nll_mask}}
    if "cu_seqlens" not in batch:
        scored, nll = (per_token * masks["loss_mask"]).sum(dim=1), (per_token * masks[nll_mask]).sum(dim=1)
        tokens = masks["loss_mask"].sum(dim=1)
        (chosen, rejected), (chosen_tokens, rejected_tokens) = (-scored).chunk(2), tokens.chunk(2)
        return PairSums(chosen, rejected, chosen_tokens, rejected_tokens, nll.chunk(2)[0])
    # Packed: sums per document (segment of cu_seqlens), then each document to its pair and side.
    per_token, flat = per_token.reshape(-1), {name: mask.reshape(-1) for name, mask in masks.items()}
    cu_seqlens = batch["cu_seqlens"]
    positions = torch.arange(per_token.numel(), device=per_token.device)
    document = torch.searchsorted(cu_seqlens[1:].to(positions.device), positions, right=True)
    pairs, real = len(batch["pair_weight"]), batch["document_pair"] >= 0

    def per_side(values: torch.Tensor) -> torch.Tensor:  # [T] -> [2, n] (chosen, rejected)
        sums = torch.zeros(len(cu_seqlens) - 1, device=values.device, dtype=values.dtype).index_add(0, document, values)
        out = torch.zeros(2 * pairs, device=values.device, dtype=values.dtype)
        index = batch["document_side"][real] * pairs + batch["document_pair"][real]
        return out.index_copy(0, index.to(values.device), sums[real.to(values.device)]).reshape(2, pairs)

    logps, tokens = per_side(-per_token * flat["loss_mask"]), per_side(flat["loss_mask"])
    nll = per_side(per_token * flat[nll_mask])
    return PairSums(logps[0], logps[1], tokens[0], tokens[1], nll[0])


def _dpo_loss_func(loss: PreferenceLoss, batch: dict, ref_logps, nll_scale: float, per_token_loss):
    nll_mask = "token_mask" if loss.nll_over_whole_sequence else "loss_mask"
    sums = pair_sums(per_token_loss, batch, nll_mask)
    ref_chosen, ref_rejected = ref_logps.to(sums.chosen.device).chunk(2)
    per_pair, chosen_rewards, rejected_rewards, chosen_shown, rejected_shown = loss.per_pair(
        sums.chosen, sums.rejected, ref_chosen, ref_rejected, sums.chosen_tokens, sums.rejected_tokens
    )
    weight = batch["pair_weight"].float()  # 1, or 0 for a validation batch's fillers
    total = (per_pair * weight).sum()
    if loss.nll_weight:  # NLL of the chosen responses, as a token mean over the global batch (see module doc)
        total = total + loss.nll_weight * nll_scale * (sums.chosen_nll * weight).sum()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    per_pair_values = (chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                       chosen_rewards - rejected_rewards, chosen_shown.detach(), rejected_shown.detach())  # fmt: skip
    report = torch.stack([total.detach(), weight.sum(), *((value * weight).sum() for value in per_pair_values)])
    report = report.double()
    return total, weight.sum().to(torch.int), {"dpo": report}


def _logps_func(batch: dict, per_token_loss):
    """Forward-only: the reference log-probs [2n] (chosen, then rejected), kept by the schedule's data store."""
    sums = pair_sums(per_token_loss, batch)
    logps = torch.cat([sums.chosen, sums.rejected]).detach()
    return torch.zeros((), device=logps.device), torch.tensor(0, dtype=torch.int), {"logps": logps}


def model_output(model, batch: dict):
    """The model's per-token loss of a micro-batch of rows [b, seq], or packed (THD: one [1, b x seq] row whose
    documents restart attention and rotary positions)."""
    from megatron_swift.training.step import packed_seq_params

    packed = None
    if "cu_seqlens" in batch:
        packed = packed_seq_params(batch["cu_seqlens"])
        tokens, labels, position_ids = (batch[key].reshape(1, -1) for key in ("tokens", "labels", "position_ids"))
    else:
        tokens, labels = batch["tokens"], batch["labels"]
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels, packed_seq_params=packed)


def _forward_step(data_iterator, model, loss: PreferenceLoss | None, nll_scale: float):
    """Policy (loss given) or reference (loss None) forward of one micro-batch of pairs: [2n, seq] rows, or packed."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    ref_logps = batch.pop("ref_logps", None)
    output = model_output(model, batch)
    if loss is None:
        return output, partial(_logps_func, batch)
    return output, partial(_dpo_loss_func, loss, batch, ref_logps, nll_scale)


def _schedule(
    chunks, microbatches: list[dict], forward_only: bool, loss: PreferenceLoss | None, nll_scale: float = 0.0
):
    forward_step = partial(_forward_step, loss=loss, nll_scale=nll_scale)
    return run_forward_backward(chunks, microbatches, forward_step, forward_only)


class ReferenceModel:
    """Where the reference log-probs come from: `adapters_off(chunks)` (LoRA), `copy(chunks)` (a frozen copy of
    the initial weights at the same layout) or `none()` (reference-free: zeros)."""

    def __init__(self, chunks: list | None, adapters: bool):
        self.chunks, self.adapters = chunks, adapters

    @classmethod
    def adapters_off(cls, policy_chunks: list) -> ReferenceModel:
        return cls(policy_chunks, adapters=True)

    @classmethod
    def copy(cls, frozen_chunks: list) -> ReferenceModel:
        for chunk in frozen_chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return cls(frozen_chunks, adapters=False)

    @classmethod
    def none(cls) -> ReferenceModel:
        return cls(None, adapters=False)

    @classmethod
    def precomputed(cls) -> ReferenceModel:
        """The micro-batches carry their reference log-probs (`precompute_reference_logps`)."""
        reference = cls(None, adapters=False)
        reference.carried = True
        return reference

    carried = False

    def attach_logps(self, microbatches: list[dict]) -> None:
        """Every micro-batch gets `ref_logps` [2n] (collective over the model's ranks; read on the last stage)."""
        if self.carried:
            return
        if self.chunks is None:
            for microbatch in microbatches:
                microbatch["ref_logps"] = torch.zeros(2 * len(microbatch["pair_weight"]))
            return
        from megatron_swift.training.optim import parameters_synced
        from megatron_swift.tuners.lora import adapters_disabled

        was_training = [chunk.training for chunk in self.chunks]
        with torch.no_grad(), parameters_synced(self.chunks), (
            adapters_disabled(self.chunks) if self.adapters else contextlib.nullcontext()
        ):  # fmt: skip
            for chunk in self.chunks:
                chunk.eval()
            reports = _schedule(self.chunks, microbatches, forward_only=True, loss=None)
        for chunk, training in zip(self.chunks, was_training, strict=True):
            chunk.train(training)
        for index, microbatch in enumerate(microbatches):  # empty reports off the last stage: never read there
            microbatch["ref_logps"] = reports[index]["logps"] if reports else torch.zeros(0)


def _global_chosen_tokens(microbatches: list[dict], mask: str) -> float:
    """Tokens of the chosen sequences under `mask` in the whole global batch (every data-parallel rank's)."""
    from megatron.core import parallel_state as ps

    local = 0.0
    for mb in microbatches:  # the NLL sums of a per-token "loss" of 1 count the chosen tokens under the mask
        counted = pair_sums(torch.ones(mb["tokens"].shape), mb, mask).chosen_nll
        local += float((counted * mb["pair_weight"]).sum())
    total = torch.tensor([local], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total.item())


def global_report(reports: list[dict], key: str = "dpo", size: int = len(REPORT)) -> torch.Tensor:
    """The reports' `key` entries ([size] sums; default: REPORT) summed over micro-batches and data-parallel ranks;
    sent from the last pipeline stage to all."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(size, dtype=torch.float64, device=comm_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in reports:
            total += item[key].to(total.device)
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    return total.cpu()


def dpo_metrics(total: torch.Tensor, names: tuple[str, ...] = REPORT) -> dict[str, float]:
    """Per-pair means of a report's global sums (`names`: its entries, `pairs` second)."""
    pairs = max(float(total[1]), 1.0)
    return {name: float(total[i]) / pairs for i, name in enumerate(names) if name != "pairs"}


@dataclass
class Preference:
    """What a preference step needs besides the model: the loss and the reference. Its reports are `report_key`
    entries of `report_names` sums (training/reward.py's reward model shares the validation and the step)."""

    loss: PreferenceLoss
    reference: ReferenceModel
    report_key = "dpo"
    report_names = REPORT

    def run(self, chunks, microbatches: list[dict], forward_only: bool) -> list[dict]:
        """The reference's log-probs, then the policy's forward (and backward) over this rank's micro-batches of
        one global batch: the per-micro-batch reports (last stage; `dpo`: REPORT sums). Collective."""
        self.reference.attach_logps(microbatches)
        nll_scale = 0.0
        if self.loss.nll_weight:
            pairs = sum(float(mb["pair_weight"].sum()) for mb in microbatches)
            mask = "token_mask" if self.loss.nll_over_whole_sequence else "loss_mask"
            nll_scale = _global_pairs(pairs) / max(_global_chosen_tokens(microbatches, mask), 1.0)
        return _schedule(chunks, microbatches, forward_only=forward_only, loss=self.loss, nll_scale=nll_scale)

    def validate(self, chunks, microbatch_groups) -> dict[str, float]:
        """Loss and metrics over the validation pairs (`val_` + the training names): forward-only over every group
        of micro-batches (a global batch each). Collective: all ranks call it at the same step."""
        from megatron_swift.training.optim import parameters_synced

        total = torch.zeros(len(self.report_names), dtype=torch.float64)
        with torch.no_grad(), parameters_synced(chunks):
            for chunk in chunks:
                chunk.eval()
            for microbatches in microbatch_groups:
                reports = self.run(chunks, microbatches, forward_only=True)
                total += global_report(reports, self.report_key, len(self.report_names))
        for chunk in chunks:
            chunk.train()
        return {f"val_{name}": value for name, value in dpo_metrics(total, self.report_names).items()}

    def train_step(self, chunks, optimizer, scheduler, microbatches: list[dict], vocab_size: int) -> StepResult:
        from megatron_swift.training.moe_metrics import router_losses

        for chunk in chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = self.run(chunks, microbatches, forward_only=False)
        lr = current_lr(optimizer)
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
        total = global_report(reports, self.report_key, len(self.report_names))
        metrics = dpo_metrics(total, self.report_names)
        loss = metrics.pop("loss")
        router = router_losses(chunks[0].config, len(microbatches))
        return StepResult(loss, int(total[1]), float(grad_norm or 0.0), lr, not updated, router, metrics)


def _global_pairs(local_pairs: float) -> float:
    from megatron.core import parallel_state as ps

    total = torch.tensor([local_pairs], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total.item())


@dataclass(frozen=True)
class WithReference:
    """A training or validation item (a pair, or a packed row of pairs) with its reference log-probs [2 x pairs]:
    the chosen sides', then the rejected sides'."""

    item: object
    ref_logps: torch.Tensor


def _pairs_in(item) -> int:
    return len(item) if isinstance(item, list) else 1  # a packed row is a list of pairs


@dataclass(frozen=True)
class ReferenceCollate:
    """The items' collate, plus `ref_logps` in the micro-batch's pair order (chosen sides, then rejected)."""

    collate: object

    def __call__(self, items: list[WithReference]) -> dict[str, torch.Tensor]:
        batch = self.collate([item.item for item in items])
        sides = [item.ref_logps.reshape(2, -1) for item in items]
        batch["ref_logps"] = torch.cat([torch.cat([side[0] for side in sides]), torch.cat([side[1] for side in sides])])
        return batch


def precompute_reference_logps(reference: ReferenceModel, items, collate, global_batch_size: int,
                               micro_batch_size: int) -> list[WithReference]:  # fmt: skip
    """Every item's reference log-probs, through the reference's forward-only schedule in global batches of items
    (each data-parallel rank its slice, as in training), gathered over data-parallel ranks. Collective."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank, found = global_batch_size // dp_size, {}
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    for start in range(0, len(items), global_batch_size):
        positions = [start + dp_rank * per_rank + i for i in range(per_rank)]
        chunks = [positions[at : at + micro_batch_size] for at in range(0, per_rank, micro_batch_size)]
        microbatches = [collate([items[p % len(items)] for p in chunk]) for chunk in chunks]
        reference.attach_logps(microbatches)
        if not last_stage:
            continue
        for chunk, microbatch in zip(chunks, microbatches, strict=True):
            chosen, rejected = microbatch["ref_logps"].cpu().chunk(2)
            offset = 0
            for p in chunk:
                count = _pairs_in(items[p % len(items)])
                if p < len(items):
                    found[p] = torch.cat([chosen[offset : offset + count], rejected[offset : offset + count]])
                offset += count
    gathered = [None] * dp_size
    dist.all_gather_object(gathered, found, group=ps.get_data_parallel_group(with_context_parallel=True))
    merged = {index: logps for part in gathered for index, logps in part.items()}
    # Off the last pipeline stage nothing reads them: zeros of the right length.
    return [WithReference(item, merged.get(i, torch.zeros(2 * _pairs_in(item)))) for i, item in enumerate(items)]
