"""The `rlhf` section: preference-training options with TRL / ms-swift field names, and their preflight checks.

Used by `train.task: dpo / simpo / orpo` (training/preference.py), `kto` (training/kto.py) and `rm`
(training/reward.py: `center_rewards_coefficient`, TRL's RewardConfig). Field names and
meanings follow TRL's `DPOConfig` (`beta`, `loss_type` as a list summed with `loss_weights`, `label_smoothing`),
`CPOConfig` (`simpo_gamma`, `cpo_alpha`), `KTOConfig` (`desirable_weight`, `undesirable_weight`, `loss_type`
kto / apo_zero_unpaired) and ms-swift's `RLHFArguments` (`rpo_alpha`, `reference_free`, `ref_model`,
`precompute_ref_logps`). Checks are pure: they return every
problem, each naming its field, and build nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_swift.data.kto import KTO_TASK
from megatron_swift.data.pairs import PAIR_TASKS, RM_TASK

# Loss types built (TRL's names and formulas; `sigmoid` with label_smoothing is cDPO, as TRL < 1.0 and ms-swift).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL's KTOConfig.loss_type


@dataclass
class RlhfSection:
    # DPO: strength of the pull towards the reference (IPO: the regularisation tau); SimPO: the reward scale;
    # ORPO: the weight of the odds-ratio term (lambda)
    beta: float = 0.1
    # DPO: one loss type, or several summed with `loss_weights` (TRL's multi-loss DPO, e.g. MPO's sigmoid + ...);
    # KTO: one of kto / apo_zero_unpaired. null: the task's default (dpo: [sigmoid], kto: [kto]).
    loss_type: list[str] | None = None
    loss_weights: list[float] | None = None  # one per loss_type (default: all 1)
    label_smoothing: float = 0.0  # cDPO (sigmoid) / robust DPO: the assumed rate of flipped preference labels
    # RPO: adds rpo_alpha x the NLL of the chosen responses (token mean over the global batch), as TRL's `sft`.
    rpo_alpha: float | None = None
    reference_free: bool = False  # no reference model: its log-probs are taken as 0
    # An HF directory of the same architecture as the reference (a frozen copy at the same layout); default: the
    # base model with adapters off (LoRA) or a frozen copy of the initial weights (full training).
    ref_model: str | None = None
    # Reference log-probs computed once before training (forward-only) and kept with the data; a frozen copy is then
    # freed for the run (it is rebuilt at start-up, also on resume, to compute them).
    precompute_ref_logps: bool = False
    simpo_gamma: float | None = None  # SimPO's target reward margin (null: TRL's 0.5)
    cpo_alpha: float | None = None  # SimPO: weight of the chosen responses' NLL (null: TRL's CPO default 1.0)
    # KTO: weights of the desirable and undesirable items' losses (TRL's; to balance unequal counts)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # rm: adds center_rewards_coefficient x (r_chosen + r_rejected)^2 per pair (TRL's RewardConfig; null: none)
    center_rewards_coefficient: float | None = None


def rlhf_problems(job) -> list[str]:
    """Every problem of the `rlhf` section and of what the preference tasks do not support (yet)."""
    r, t = job.rlhf, job.train
    found = []
    if t.task != RM_TASK and r.center_rewards_coefficient is not None:
        found.append("rlhf.center_rewards_coefficient: used by train.task rm only")
    if t.task not in (*PAIR_TASKS, KTO_TASK, RM_TASK):
        return found
    if t.task == RM_TASK:
        return reward_model_problems(job) + unsupported_problems(job)
    if t.task != "simpo":
        found += [f"rlhf.{name}: used by train.task simpo only" for name in ("simpo_gamma", "cpo_alpha")
                  if getattr(r, name) is not None]  # fmt: skip
    if t.task != KTO_TASK:
        found += [f"rlhf.{name}: used by train.task kto only" for name in ("desirable_weight", "undesirable_weight")
                  if getattr(r, name) != 1.0]  # fmt: skip
    if t.task in ("simpo", "orpo"):  # no reference, one fixed loss
        changed = [name for name, value, default in (
            ("loss_type", r.loss_type, None), ("loss_weights", r.loss_weights, None),
            ("rpo_alpha", r.rpo_alpha, None), ("reference_free", r.reference_free, False),
            ("ref_model", r.ref_model, None), ("precompute_ref_logps", r.precompute_ref_logps, False),
        ) if value != default]  # fmt: skip
        found += [f"rlhf.{name}: used by train.task dpo only ({t.task} has no reference and one loss)"
                  for name in changed]  # fmt: skip
        if t.task == "orpo" and r.label_smoothing:
            found.append("rlhf.label_smoothing: not used by train.task orpo")
    if r.beta <= 0:
        found.append(f"rlhf.beta={r.beta} must be > 0")
    if t.task == KTO_TASK:
        found += kto_problems(job)
    else:
        found += dpo_loss_problems(r, t.task)
    for name in ("rpo_alpha", "cpo_alpha"):
        if getattr(r, name) is not None and getattr(r, name) < 0:
            found.append(f"rlhf.{name}={getattr(r, name)} must be >= 0")
    if r.reference_free and (r.precompute_ref_logps or r.ref_model):
        found.append("rlhf.reference_free: a reference-free run has no reference (unset rlhf.ref_model and "
                     "rlhf.precompute_ref_logps)")  # fmt: skip
    if (
        t.task in ("dpo", KTO_TASK)
        and t.train_type == "lora"
        and job.lora.modules_to_save
        and not (r.reference_free or r.ref_model)
    ):
        found.append("lora.modules_to_save: the reference (the model with adapters off) would use the trained "
                     "modules; leave modules_to_save empty or set rlhf.ref_model")  # fmt: skip
    return found + unsupported_problems(job)


def unsupported_problems(job) -> list[str]:
    """What preference training does not support yet, each named (the SFT path supports them)."""
    d, p, found = job.data, job.parallel, []
    for bad, problem in (
        (d.streaming, "data.streaming: preference data is read whole; set data.streaming: false"),
        (d.format == "text", "data.format=text: preference rows are conversations (messages + rejected_response, "
                             "or messages + label for kto)"),
        (p.context_parallel_size > 1, "parallel.context_parallel_size: preference training needs 1 (per-sequence "
                                      "log-probs are not yet reduced over context-parallel ranks)"),
        (job.model.fused_linear_cross_entropy, "model.fused_linear_cross_entropy: preference training needs "
                                               "per-token log-probs; set it to false"),
    ):  # fmt: skip
        if bad:
            found.append(problem)
    return found


def reward_model_problems(job) -> list[str]:
    """train.task rm: TRL's RewardTrainer options only; what reward models are not built with, named."""
    r, d, t = job.rlhf, job.data, job.train
    found = []
    defaults = RlhfSection()
    found += [f"rlhf.{name}: not used by train.task rm (TRL's RewardTrainer has no such option)"
              for name in vars(defaults) if name != "center_rewards_coefficient"
              and getattr(r, name) != getattr(defaults, name)]  # fmt: skip
    if d.max_length is not None and d.max_length > d.seq_length:
        found.append(f"data.max_length={d.max_length}: train.task rm reads the reward at a sample's last token, so a "
                     f"sample is at most data.seq_length={d.seq_length} tokens")  # fmt: skip
    if t.train_type == "lora" and job.lora.adapter:
        found.append("lora.adapter: starting a reward model from a PEFT adapter is not built; merge it into the base "
                     "(or start from a reward model's HF directory)")  # fmt: skip
    return found


def dpo_loss_problems(r, task: str) -> list[str]:
    found = []
    loss_type = r.loss_type or ["sigmoid"]
    unknown = [name for name in loss_type if name not in DPO_LOSS_TYPES]
    if unknown or (r.loss_type is not None and not r.loss_type):
        found.append(f"rlhf.loss_type={r.loss_type}: choose one or more of {', '.join(DPO_LOSS_TYPES)}")
    if len(set(loss_type)) != len(loss_type):
        found.append(f"rlhf.loss_type={r.loss_type}: each loss type at most once")
    if r.loss_weights is not None and len(r.loss_weights) != len(loss_type):
        found.append(
            f"rlhf.loss_weights={r.loss_weights}: one weight per rlhf.loss_type entry ({len(loss_type)} given)"
        )
    if not 0 <= r.label_smoothing < 0.5:
        found.append(f"rlhf.label_smoothing={r.label_smoothing} must be in [0, 0.5)")
    elif task == "dpo" and r.label_smoothing and not {"sigmoid", "robust"} & set(loss_type):
        found.append("rlhf.label_smoothing: used by loss_type sigmoid (cDPO) and robust only")
    return found


def kto_problems(job) -> list[str]:
    """train.task kto: TRL's KTOTrainer options only; what KTO is not built with, named."""
    r, t = job.rlhf, job.train
    found = []
    if r.loss_type is not None and (len(r.loss_type) != 1 or r.loss_type[0] not in KTO_LOSS_TYPES):
        found.append(f"rlhf.loss_type={r.loss_type}: train.task kto takes one of {', '.join(KTO_LOSS_TYPES)}")
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(r, name) <= 0:
            found.append(f"rlhf.{name}={getattr(r, name)} must be > 0")
    changed = [name for name, value, default in (
        ("loss_weights", r.loss_weights, None), ("label_smoothing", r.label_smoothing, 0.0),
        ("rpo_alpha", r.rpo_alpha, None), ("reference_free", r.reference_free, False),
    ) if value != default]  # fmt: skip
    found += [f"rlhf.{name}: not used by train.task kto (TRL's KTOTrainer has no such option)" for name in changed]
    if (r.loss_type or ["kto"]) == ["kto"] and t.global_batch_size < 2:
        found.append("train.global_batch_size: kto estimates its KL term from the other items of the global batch "
                     "(their completions with this item's prompt), so it needs at least 2")  # fmt: skip
    return found
