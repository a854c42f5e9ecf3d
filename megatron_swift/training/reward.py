"""Reward models (train.task rm): TRL's RewardTrainer loss on preference pairs; one step.

The model is a RewardGPTModel (models/reward.py): its last stage returns per-token scores [2n, seq] for a
micro-batch of n pairs (data/pairs.py: the n chosen rows, then their n rejected rows, each a whole sample; packed:
one row of whole pairs, each side a document), and each side's reward is its score at `reward_position`, the last
non-pad token (HF's rule). Per pair, as TRL's
`RewardTrainer.compute_loss`:

    loss = -logsigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2

(`margin`: the row's, 0 without one). TRL takes the mean of both terms over its batch; here the schedule's loss is
the micro-batch's sum of per-pair losses with the pair count as megatron-core's token count
(`calculate_per_token_loss`), so the step is the mean over the global batch's pairs whatever the split, as
preference.py's DPO step. Metrics (per-pair means, DPO's names): `rewards/chosen`, `rewards/rejected`,
`rewards/margins` (r_chosen - r_rejected) and `rewards/accuracies` (r_chosen > r_rejected; TRL's `accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from megatron_swift.training.preference import Preference
from megatron_swift.training.step import run_forward_backward

# Reported per micro-batch (sums over its pairs) and summed over the global batch.
REPORT = ("loss", "pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class RewardLoss:
    """TRL's RewardTrainer loss: Bradley-Terry, with its reward-centering term."""

    center_rewards_coefficient: float | None = None

    @classmethod
    def from_section(cls, rlhf) -> RewardLoss:
        return cls(rlhf.center_rewards_coefficient)

    def per_pair(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        loss = -F.logsigmoid(chosen - rejected - margin)
        if self.center_rewards_coefficient is not None:
            loss = loss + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return loss


def pair_rewards(scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards [n] from the per-token scores [2n, seq]: each row's at its reward position."""
    positions = batch["reward_position"].to(scores.device)
    if "cu_seqlens" in batch:  # packed: positions into the flattened rows
        rewards = scores.reshape(-1)[positions]
    else:
        rewards = scores[torch.arange(scores.shape[0], device=scores.device), positions]
    chosen, rejected = rewards.chunk(2)
    return chosen, rejected


def _loss_func(loss: RewardLoss, batch: dict, scores: torch.Tensor):
    chosen, rejected = pair_rewards(scores, batch)
    weight = batch["pair_weight"].to(chosen.device, chosen.dtype)  # 1, or 0 for a validation batch's fillers
    per_pair = loss.per_pair(chosen, rejected, batch["margin"].to(chosen.device, chosen.dtype))
    total = (per_pair * weight).sum()
    chosen, rejected = chosen.detach().double(), rejected.detach().double()
    weight = weight.double()
    values = (chosen, rejected, (chosen > rejected).double(), chosen - rejected)
    report = torch.stack([total.detach().double(), weight.sum(), *((value * weight).sum() for value in values)])
    return total, weight.sum().to(torch.int), {"rm": report}


def _forward_step(data_iterator, model, loss: RewardLoss):
    """One micro-batch of pairs: [2n, seq] rows, or packed (THD: one [1, mbs x seq] row whose documents restart
    attention and rotary positions)."""
    from megatron_swift.training.step import packed_seq_params

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    packed = None
    if "cu_seqlens" in batch:
        packed = packed_seq_params(batch["cu_seqlens"])
        tokens, position_ids = batch["tokens"].reshape(1, -1), batch["position_ids"].reshape(1, -1)
    else:
        tokens = batch["tokens"]
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, packed_seq_params=packed), partial(_loss_func, loss, batch)


@dataclass
class Reward(Preference):
    """What a reward-model step needs besides the model: the loss (no reference). Validation and the step are
    Preference's, over this module's report."""

    loss: RewardLoss
    reference: None = None
    report_key = "rm"
    report_names = REPORT

    def run(self, chunks, microbatches: list[dict], forward_only: bool) -> list[dict]:
        """The forward (and backward) over this rank's micro-batches of one global batch: the per-micro-batch
        reports (last stage; `rm`: REPORT sums). Collective."""
        forward_step = partial(_forward_step, loss=self.loss)
        return run_forward_backward(chunks, microbatches, forward_step, forward_only)
