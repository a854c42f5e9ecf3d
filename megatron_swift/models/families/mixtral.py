"""Mixtral (MixtralForCausalLM): Mistral attention + sparse MoE (w1=gate, w3=up, w2=down), renormalised top-k."""

from megatron_swift.models.families.common import ATTENTION, EMBEDDINGS, IGNORE_HF, TINY_DENSE, routed_experts
from megatron_swift.models.family import Family, MoEFields, register
from megatron_swift.models.mapping import RuleSet

MOE = "model.layers.{layer}.block_sparse_moe"

MIXTRAL = register(
    Family(
        name="mixtral",
        model_type="mixtral",
        architectures=("MixtralForCausalLM",),
        mapping=RuleSet(
            EMBEDDINGS
            + ATTENTION
            + routed_experts(f"{MOE}.gate.weight", MOE + ".experts.{expert}", "w1.weight", "w3.weight", "w2.weight"),
            ignore_hf=IGNORE_HF,
        ),
        moe=MoEFields(num_experts="num_local_experts", norm_topk_prob=True),
        tiny_config=dict(
            TINY_DENSE,
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            sliding_window=None,
        ),
    )
)
