"""MoE training options (`moe` section, megatron-core names): validation and TransformerConfig fields.

The model's declaration (models/hf_config.py) sets what the HF model defines: experts, top-k, the router's
auxiliary-loss type and coefficient (`router_aux_loss_coef`; DeepSeek-V3: a sequence-wise loss weighted
`aux_loss_alpha`), dropless routing, a per-expert routing bias. These options change how it is trained: the
load-balancing loss and its weight, the router z-loss, the routing bias's update rate (megatron-core's rule:
after each step every bias moves by the rate towards balance, +rate for experts that got fewer tokens than the
mean, -rate for more; frozen with the base model under LoRA), a per-expert capacity with token dropping
(megatron-core computes the capacity from this rank's tokens of each micro-batch), and the token dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal


@dataclass
class MoeSection:
    # None: the model's (aux_loss; seq_aux_loss for DeepSeek-V3 configs with seq_aux)
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] | None = None
    moe_aux_loss_coeff: float | None = None  # None: the HF config's router_aux_loss_coef
    # Models with a per-expert routing bias (DeepSeek-V3's e_score_correction_bias). None: megatron-core's 1e-3.
    moe_router_bias_update_rate: float | None = None
    moe_z_loss_coeff: float | None = None
    moe_expert_capacity_factor: float | None = None  # None: dropless, like the HF model
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    # auto: alltoall on GPU; allgather on CPU (megatron's all-to-all dispatcher needs CUDA streams)
    moe_token_dispatcher_type: Literal["auto", "allgather", "alltoall"] = "auto"


def moe_problems(moe: MoeSection, is_moe: bool | None, expert_bias: bool | None = None) -> list[str]:
    """Every problem of the `moe` section; `is_moe` / `expert_bias` None when the model is not known yet."""
    changed = [f.name for f in fields(moe) if getattr(moe, f.name) != f.default]
    if is_moe is False:
        return [f"moe.{name}: the model has no experts" for name in changed]
    found = []
    if moe.moe_router_bias_update_rate is not None and expert_bias is False:
        found.append("moe.moe_router_bias_update_rate: the model's router has no per-expert bias")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_router_bias_update_rate"):
        value = getattr(moe, name)
        if value is not None and value < 0:
            found.append(f"moe.{name}={value} must be >= 0")
    factor = moe.moe_expert_capacity_factor
    if factor is not None and factor <= 0:
        found.append(f"moe.moe_expert_capacity_factor={factor} must be > 0 (null: dropless)")
    if moe.moe_pad_expert_input_to_capacity and factor is None:
        found.append("moe.moe_pad_expert_input_to_capacity: needs moe.moe_expert_capacity_factor")
    return found


def moe_overrides(moe: MoeSection, on_gpu: bool, lora: bool = False) -> dict:
    """TransformerConfig fields for a MoE model (the HF config's loss type and coefficient stay unless overridden).

    Under LoRA the routing bias stays the base model's (rate 0): like the frozen router weight, it is not part
    of the adapter a LoRA checkpoint or PEFT export holds, so updating it would make resume and export lose it."""
    dispatcher = moe.moe_token_dispatcher_type
    overrides = dict(
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_token_drop_policy=moe.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
        moe_token_dispatcher_type=("alltoall" if on_gpu else "allgather") if dispatcher == "auto" else dispatcher,
    )
    if moe.moe_router_load_balancing_type is not None:
        overrides["moe_router_load_balancing_type"] = moe.moe_router_load_balancing_type
    if moe.moe_aux_loss_coeff is not None:
        overrides["moe_aux_loss_coeff"] = moe.moe_aux_loss_coeff
    if moe.moe_router_bias_update_rate is not None:
        overrides["moe_router_bias_update_rate"] = moe.moe_router_bias_update_rate
    if lora:
        overrides["moe_router_bias_update_rate"] = 0.0
    return overrides
