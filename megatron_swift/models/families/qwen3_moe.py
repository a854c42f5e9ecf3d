"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (qk-norm) + MoE experts; optional dense layers."""

from megatron_swift.models.families.common import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    IGNORE_HF,
    QK_NORM,
    TINY_DENSE,
    routed_experts,
)
from megatron_swift.models.family import Family, MoEFields, register
from megatron_swift.models.mapping import RuleSet

HF_MLP = "model.layers.{layer}.mlp"
QWEN_EXPERTS = routed_experts(
    f"{HF_MLP}.gate.weight", HF_MLP + ".experts.{expert}", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)

QWEN_MOE_FIELDS = MoEFields(
    num_experts="num_experts",
    expert_ffn_hidden_size="moe_intermediate_size",
    norm_topk_prob="norm_topk_prob",
    sparse_step="decoder_sparse_step",
    dense_layers="mlp_only_layers",
)

QWEN3_MOE = register(
    Family(
        name="qwen3_moe",
        model_type="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        mapping=RuleSet(EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP + QWEN_EXPERTS, ignore_hf=IGNORE_HF),
        qk_layernorm=True,
        moe=QWEN_MOE_FIELDS,
        # Layer 0 dense (mlp_only_layers) to exercise mixed dense/MoE stacks, as some Qwen-MoE configs do.
        tiny_config=dict(
            TINY_DENSE,
            head_dim=16,
            moe_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
        ),
    )
)
