"""GLM-4.5 / 4.6 (Glm4MoeForCausalLM): GQA with q/k/v biases, optional qk-norm, partial rotary, and DeepSeek-V3's
MoE (sigmoid routing with a per-expert bias, shared experts, first dense layers, routed scaling).

`attention_bias` biases q/k/v only here (o_proj has none), so it is megatron's add_qkv_bias; the rotary
embedding covers the first `partial_rotary_factor` of each head, as megatron's rotary_percent. The
multi-token-prediction layer (`model.layers.{num_hidden_layers}`) is refused by the converter's preflight.
"""

from megatron_swift.models.families.common import ATTENTION, DENSE_MLP, EMBEDDINGS, IGNORE_HF, QK_NORM
from megatron_swift.models.families.deepseek_v3 import SIGMOID_MOE_RULES
from megatron_swift.models.family import Family, MoEFields, register
from megatron_swift.models.mapping import RuleSet

# zai-org/GLM-4.5 config.json, every field kept but `torch_dtype` and `transformers_version` (written by
# save_pretrained), with the sizes shrunk: 4 layers (1 dense + 3 MoE), 8 experts, top-2, head_dim 16 (rotary 8).
GLM4_5_CONFIG = dict(
    attention_bias=True,
    attention_dropout=0.0,
    pad_token_id=151329,
    eos_token_id=[151329, 151336, 151338],
    head_dim=128,
    hidden_act="silu",
    hidden_size=5120,
    partial_rotary_factor=0.5,
    initializer_range=0.02,
    intermediate_size=12288,
    max_position_embeddings=131072,
    moe_intermediate_size=1536,
    norm_topk_prob=True,
    num_attention_heads=96,
    n_group=1,
    topk_group=1,
    n_routed_experts=160,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    num_hidden_layers=92,
    num_key_value_heads=8,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    rope_theta=1000000,
    num_nextn_predict_layers=1,
    tie_word_embeddings=False,
    use_cache=True,
    use_qk_norm=True,
    vocab_size=151552,
)

TINY = dict(
    GLM4_5_CONFIG,
    eos_token_id=None,  # the tiny tokenizer's ids are set by the tiny-model maker
    pad_token_id=None,
    head_dim=16,
    hidden_size=64,
    intermediate_size=160,
    moe_intermediate_size=32,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    num_hidden_layers=4,
    num_key_value_heads=2,
    vocab_size=384,
)

GLM4_MOE = register(
    Family(
        name="glm4_moe",
        model_type="glm4_moe",
        architectures=("Glm4MoeForCausalLM",),
        mapping=RuleSet(EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP + SIGMOID_MOE_RULES, ignore_hf=IGNORE_HF),
        qkv_bias="attention_bias",
        qk_layernorm="use_qk_norm",
        moe=MoEFields(
            num_experts="n_routed_experts",
            expert_ffn_hidden_size="moe_intermediate_size",
            norm_topk_prob="norm_topk_prob",
            score_function="sigmoid",
            expert_bias=True,
            num_groups="n_group",
            group_topk="topk_group",
            topk_scaling_factor="routed_scaling_factor",
            first_dense_layers="first_k_dense_replace",
            shared_expert_count="n_shared_experts",
        ),
        tiny_config=TINY,
    )
)
