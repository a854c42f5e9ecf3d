"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): Qwen2 attention + routed experts + a gated shared expert."""

from megatron_swift.models.families.llama import ATTENTION, DENSE_MLP, EMBEDDINGS, IGNORE_HF, TINY_DENSE
from megatron_swift.models.family import Family, MoEFields, register
from megatron_swift.models.mapping import FusedGateUp, Rename, RuleSet

HF_MLP = "model.layers.{layer}.mlp"
MLP = "decoder.layers.{layer}.mlp"

QWEN2_MOE = register(
    Family(
        name="qwen2_moe",
        model_type="qwen2_moe",
        architectures=("Qwen2MoeForCausalLM",),
        mapping=RuleSet(
            EMBEDDINGS
            + ATTENTION
            + DENSE_MLP
            + (
                Rename(f"{MLP}.router.weight", hf_name=f"{HF_MLP}.gate.weight"),
                FusedGateUp(
                    f"{MLP}.experts.local_experts.{{expert}}.linear_fc1.weight",
                    gate=f"{HF_MLP}.experts.{{expert}}.gate_proj.weight",
                    up=f"{HF_MLP}.experts.{{expert}}.up_proj.weight",
                ),
                Rename(
                    f"{MLP}.experts.local_experts.{{expert}}.linear_fc2.weight",
                    hf_name=f"{HF_MLP}.experts.{{expert}}.down_proj.weight",
                ),
                FusedGateUp(
                    f"{MLP}.shared_experts.linear_fc1.weight",
                    gate=f"{HF_MLP}.shared_expert.gate_proj.weight",
                    up=f"{HF_MLP}.shared_expert.up_proj.weight",
                ),
                Rename(f"{MLP}.shared_experts.linear_fc2.weight", hf_name=f"{HF_MLP}.shared_expert.down_proj.weight"),
                Rename(f"{MLP}.shared_experts.gate_weight", hf_name=f"{HF_MLP}.shared_expert_gate.weight"),
            ),
            ignore_hf=IGNORE_HF,
        ),
        qkv_bias=True,
        moe=MoEFields(
            num_experts="num_experts",
            expert_ffn_hidden_size="moe_intermediate_size",
            norm_topk_prob="norm_topk_prob",
            sparse_step="decoder_sparse_step",
            dense_layers="mlp_only_layers",
            shared_expert_ffn_hidden_size="shared_expert_intermediate_size",
            shared_expert_gate=True,
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
