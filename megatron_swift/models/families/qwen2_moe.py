"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): Qwen2 attention + routed experts + a gated shared expert."""

import dataclasses

from megatron_swift.models.families.common import ATTENTION, DENSE_MLP, EMBEDDINGS, IGNORE_HF, TINY_DENSE
from megatron_swift.models.families.qwen3_moe import HF_MLP, QWEN_EXPERTS, QWEN_MOE_FIELDS
from megatron_swift.models.family import Family, register
from megatron_swift.models.mapping import FusedGateUp, Rename, RuleSet

SHARED = "decoder.layers.{layer}.mlp.shared_experts"

QWEN2_MOE = register(
    Family(
        name="qwen2_moe",
        model_type="qwen2_moe",
        architectures=("Qwen2MoeForCausalLM",),
        mapping=RuleSet(
            EMBEDDINGS
            + ATTENTION
            + DENSE_MLP
            + QWEN_EXPERTS
            + (
                FusedGateUp(
                    f"{SHARED}.linear_fc1.weight",
                    gate=f"{HF_MLP}.shared_expert.gate_proj.weight",
                    up=f"{HF_MLP}.shared_expert.up_proj.weight",
                ),
                Rename(f"{SHARED}.linear_fc2.weight", hf_name=f"{HF_MLP}.shared_expert.down_proj.weight"),
                Rename(f"{SHARED}.gate_weight", hf_name=f"{HF_MLP}.shared_expert_gate.weight"),
            ),
            ignore_hf=IGNORE_HF,
        ),
        qkv_bias=True,
        moe=dataclasses.replace(
            QWEN_MOE_FIELDS, shared_expert_ffn_hidden_size="shared_expert_intermediate_size", shared_expert_gate=True
        ),
        tiny_config=dict(
            TINY_DENSE,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    )
)
