"""DeepSeek-V3 / R1 and Kimi-K2 (DeepseekV3ForCausalLM): multi-latent attention, YaRN, sigmoid routing with a
per-expert bias (aux-loss-free balancing), group-limited top-k, shared experts, first dense layers.

Multi-token-prediction layers (`model.layers.{num_hidden_layers}...`, `num_nextn_predict_layers`) are refused
by the converter's preflight, never dropped; checkpoints stored in FP8 are not read (dequantize first).
"""

from megatron_swift.config import ConfigError
from megatron_swift.models.families.common import DENSE_MLP, EMBEDDINGS, IGNORE_HF, LAYER, routed_experts
from megatron_swift.models.family import MLA_LINEARS, Family, MoEFields, register
from megatron_swift.models.mapping import FusedGateUp, Rename, RuleSet

ATTN = "model.layers.{layer}.self_attn"
MLP = "model.layers.{layer}.mlp"
MLA = f"{LAYER}.self_attention"

MLA_RULES = (
    Rename(f"{LAYER}.input_layernorm.weight", hf_name="model.layers.{layer}.input_layernorm.weight"),
    Rename(f"{MLA}.linear_q_proj.weight", hf_name=f"{ATTN}.q_proj.weight"),  # configs without q_lora_rank
    Rename(f"{MLA}.linear_q_down_proj.weight", hf_name=f"{ATTN}.q_a_proj.weight"),
    Rename(f"{MLA}.q_layernorm.weight", hf_name=f"{ATTN}.q_a_layernorm.weight"),
    Rename(f"{MLA}.linear_q_up_proj.weight", hf_name=f"{ATTN}.q_b_proj.weight"),
    Rename(f"{MLA}.linear_kv_down_proj.weight", hf_name=f"{ATTN}.kv_a_proj_with_mqa.weight"),
    Rename(f"{MLA}.kv_layernorm.weight", hf_name=f"{ATTN}.kv_a_layernorm.weight"),
    Rename(f"{MLA}.linear_kv_up_proj.weight", hf_name=f"{ATTN}.kv_b_proj.weight"),
    Rename(f"{MLA}.linear_proj.weight", hf_name=f"{ATTN}.o_proj.weight"),
    Rename(f"{LAYER}.pre_mlp_layernorm.weight", hf_name="model.layers.{layer}.post_attention_layernorm.weight"),
)

SHARED = f"{LAYER}.mlp.shared_experts"
# Routed experts, the router with its routing bias, shared experts: DeepSeek-V3's MoE layer (GLM-4.5's too).
SIGMOID_MOE_RULES = (
    *routed_experts(
        f"{MLP}.gate.weight", MLP + ".experts.{expert}", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
    ),
    Rename(f"{LAYER}.mlp.router.expert_bias", hf_name=f"{MLP}.gate.e_score_correction_bias"),
    FusedGateUp(
        f"{SHARED}.linear_fc1.weight",
        gate=f"{MLP}.shared_experts.gate_proj.weight",
        up=f"{MLP}.shared_experts.up_proj.weight",
    ),
    Rename(f"{SHARED}.linear_fc2.weight", hf_name=f"{MLP}.shared_experts.down_proj.weight"),
)

# The fields of DeepSeek-V3's config.json that only its remote code read, and the one value each must have for
# transformers' DeepseekV3 (the reference) and this translation to compute what the checkpoint was trained as.
_REMOTE_CODE_FIELDS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


def deepseek_extras(hf_config, transformer: dict) -> None:
    """DeepSeek-only fields: the remote code's router settings, and its sequence-wise auxiliary loss."""
    for name, expected in _REMOTE_CODE_FIELDS.items():
        value = getattr(hf_config, name, expected)
        if value != expected:
            raise ConfigError(f"{name}={value!r} is not supported; DeepSeek-V3 checkpoints use {expected!r}")
    if getattr(hf_config, "seq_aux", False):
        # DeepSeek-V3's complementary balance loss is per sequence (megatron's seq_aux_loss), weight aux_loss_alpha.
        transformer["moe_router_load_balancing_type"] = "seq_aux_loss"


# deepseek-ai/DeepSeek-V3 config.json, every field kept but `auto_map` (remote code), `torch_dtype` and
# `transformers_version` (written by save_pretrained) and `quantization_config` (the real weights are FP8; the
# tiny model's are not), with the sizes shrunk: 4 layers (1 dense + 3 MoE), 8 experts in 4 groups, top-4 within
# the best 2 groups (8 // 4 as in the real model: the top-2 group score), small MLA ranks.
DEEPSEEK_V3_CONFIG = dict(
    attention_bias=False,
    attention_dropout=0.0,
    aux_loss_alpha=0.001,
    bos_token_id=0,
    eos_token_id=1,
    ep_size=1,
    first_k_dense_replace=3,
    hidden_act="silu",
    hidden_size=7168,
    initializer_range=0.02,
    intermediate_size=18432,
    kv_lora_rank=512,
    max_position_embeddings=163840,
    moe_intermediate_size=2048,
    moe_layer_freq=1,
    n_group=8,
    n_routed_experts=256,
    n_shared_experts=1,
    norm_topk_prob=True,
    num_attention_heads=128,
    num_experts_per_tok=8,
    num_hidden_layers=61,
    num_key_value_heads=128,
    num_nextn_predict_layers=1,
    q_lora_rank=1536,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    rms_norm_eps=1e-06,
    rope_scaling=dict(
        beta_fast=32,
        beta_slow=1,
        factor=40,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
        type="yarn",
    ),
    rope_theta=10000,
    routed_scaling_factor=2.5,
    scoring_func="sigmoid",
    seq_aux=True,
    tie_word_embeddings=False,
    topk_group=4,
    topk_method="noaux_tc",
    use_cache=True,
    v_head_dim=128,
    vocab_size=129280,
)

TINY = dict(
    DEEPSEEK_V3_CONFIG,
    first_k_dense_replace=1,
    hidden_size=64,
    intermediate_size=160,
    kv_lora_rank=16,
    moe_intermediate_size=32,
    n_group=4,
    n_routed_experts=8,
    num_attention_heads=4,
    num_experts_per_tok=4,
    num_hidden_layers=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    topk_group=2,
    v_head_dim=16,
    vocab_size=384,
)

DEEPSEEK_V3 = register(
    Family(
        name="deepseek_v3",
        model_type="deepseek_v3",
        architectures=("DeepseekV3ForCausalLM",),
        mapping=RuleSet(EMBEDDINGS + MLA_RULES + DENSE_MLP + SIGMOID_MOE_RULES, ignore_hf=IGNORE_HF),
        attention="mla",
        rope_types=("default", "yarn"),
        lora_linears=MLA_LINEARS,
        moe=MoEFields(
            num_experts="n_routed_experts",
            expert_ffn_hidden_size="moe_intermediate_size",
            aux_loss_coeff="aux_loss_alpha",
            norm_topk_prob="norm_topk_prob",
            score_function="sigmoid",
            expert_bias=True,
            num_groups="n_group",
            group_topk="topk_group",
            topk_scaling_factor="routed_scaling_factor",
            first_dense_layers="first_k_dense_replace",
            shared_expert_count="n_shared_experts",
        ),
        extras=deepseek_extras,
        tiny_config=TINY,
    )
)
