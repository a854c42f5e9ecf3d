"""gpt-oss (GptOssForCausalLM): GQA with biases on q/k/v/o and a learned sink logit per head, sliding-window
attention on alternate layers (`layer_types`), YaRN, and a MoE of clamped-SwiGLU experts with biases behind a
router with a bias (top-k on the logits, softmax over the k).

megatron-core expresses each piece: every linear biased (add_bias_linear: q/k/v, linear_proj, experts, router),
softmax_type "learnable" (the sinks, models/attention.py computes them exactly on the SDPA path), window_size /
window_attn_skip_freq, YaRN (models/hf_config.py), and the experts' activation as a gated linear unit with
`activation_func_clamp_value` = swiglu_limit (gate clamped above, up on both sides), quick_gelu
(x * sigmoid(1.702 x): HF's gate * sigmoid(gate * swiglu_alpha)) and `glu_linear_offset` 1 ((up + 1) * glu).
HF stores every layer's experts stacked, transposed ([experts, in, out]) and with gate / up interleaved along
the output columns; the mapping takes each expert's slice (models/mapping.py ExpertSlice). MXFP4 checkpoints
(the published ones) are dequantized on load (checkpoint/mxfp4.py). Refused, naming the field: swiglu_alpha
other than quick_gelu's 1.702, attention_bias=false (the experts and router stay biased: megatron-core biases
every linear or none).
"""

from megatron_swift.config import ConfigError
from megatron_swift.models.families.common import ATTENTION, EMBEDDINGS, IGNORE_HF, LAYER
from megatron_swift.models.family import Family, MoEFields, register
from megatron_swift.models.mapping import ExpertSlice, Rename, RuleSet

ATTN = "model.layers.{layer}.self_attn"
EXPERTS = "model.layers.{layer}.mlp.experts"
MCORE_EXPERT = f"{LAYER}.mlp.experts.local_experts.{{expert}}"

RULES = (
    *EMBEDDINGS,
    *ATTENTION,
    Rename(f"{LAYER}.self_attention.linear_proj.bias", hf_name=f"{ATTN}.o_proj.bias"),
    Rename(f"{LAYER}.self_attention.core_attention.softmax_offset", hf_name=f"{ATTN}.sinks"),
    Rename(f"{LAYER}.mlp.router.weight", hf_name="model.layers.{layer}.mlp.router.weight"),
    Rename(f"{LAYER}.mlp.router.bias", hf_name="model.layers.{layer}.mlp.router.bias"),
    ExpertSlice(f"{MCORE_EXPERT}.linear_fc1.weight", hf_name=f"{EXPERTS}.gate_up_proj", interleaved_gate_up=True),
    ExpertSlice(f"{MCORE_EXPERT}.linear_fc1.bias", hf_name=f"{EXPERTS}.gate_up_proj_bias", interleaved_gate_up=True),
    ExpertSlice(f"{MCORE_EXPERT}.linear_fc2.weight", hf_name=f"{EXPERTS}.down_proj"),
    ExpertSlice(f"{MCORE_EXPERT}.linear_fc2.bias", hf_name=f"{EXPERTS}.down_proj_bias"),
)

# megatron-core's quick_gelu: x * sigmoid(1.702 * x).
QUICK_GELU_ALPHA = 1.702


def gpt_oss_extras(hf_config, transformer: dict) -> None:
    """gpt-oss-only fields: the experts' clamped SwiGLU, and the biases megatron-core can only put everywhere."""
    from megatron.core.activations import quick_gelu

    if not getattr(hf_config, "attention_bias", True):
        raise ConfigError(
            "attention_bias=false is not supported for gpt_oss: its experts and router keep their biases, and "
            "megatron-core biases every linear (add_bias_linear) or none"
        )
    alpha = float(getattr(hf_config, "swiglu_alpha", QUICK_GELU_ALPHA))
    if alpha != QUICK_GELU_ALPHA:
        raise ConfigError(
            f"swiglu_alpha={alpha} is not supported: megatron-core's gated quick_gelu has the fixed gain "
            f"{QUICK_GELU_ALPHA} (gpt-oss checkpoints use it)"
        )
    transformer.update(
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=float(hf_config.swiglu_limit),
    )


# openai/gpt-oss-20b config.json, every field kept but `transformers_version` (written by save_pretrained) and
# `quantization_config` (the real experts are MXFP4; the tiny model's are not, tests/test_gpt_oss.py quantizes
# them), with the sizes shrunk: 4 layers (sliding / full twice), 8 experts, top-2 (the real 4 of 32), a window
# of 8 tokens (the tests' sequences are longer), head_dim 16.
GPT_OSS_20B_CONFIG = dict(
    attention_bias=True,
    attention_dropout=0.0,
    eos_token_id=200002,
    experts_per_token=4,
    head_dim=64,
    hidden_act="silu",
    hidden_size=2880,
    initial_context_length=4096,
    initializer_range=0.02,
    intermediate_size=2880,
    layer_types=["sliding_attention", "full_attention"] * 12,
    max_position_embeddings=131072,
    num_attention_heads=64,
    num_experts_per_tok=4,
    num_hidden_layers=24,
    num_key_value_heads=8,
    num_local_experts=32,
    output_router_logits=False,
    pad_token_id=199999,
    rms_norm_eps=1e-05,
    rope_scaling=dict(
        beta_fast=32.0,
        beta_slow=1.0,
        factor=32.0,
        original_max_position_embeddings=4096,
        rope_type="yarn",
        truncate=False,
    ),
    rope_theta=150000,
    router_aux_loss_coef=0.9,
    sliding_window=128,
    swiglu_limit=7.0,
    tie_word_embeddings=False,
    use_cache=True,
    vocab_size=201088,
)

TINY = dict(
    GPT_OSS_20B_CONFIG,
    eos_token_id=None,  # the tiny tokenizer's ids are set by the tiny-model maker
    pad_token_id=None,
    experts_per_token=2,
    head_dim=16,
    hidden_size=64,
    intermediate_size=32,
    layer_types=["sliding_attention", "full_attention"] * 2,
    num_attention_heads=4,
    num_experts_per_tok=2,
    num_hidden_layers=4,
    num_key_value_heads=2,
    num_local_experts=8,
    sliding_window=8,
    vocab_size=384,
)

GPT_OSS = register(
    Family(
        name="gpt_oss",
        model_type="gpt_oss",
        architectures=("GptOssForCausalLM",),
        mapping=RuleSet(RULES, ignore_hf=IGNORE_HF),
        qkv_bias="attention_bias",
        linear_bias="attention_bias",
        attention_sinks=True,
        window_layers=True,
        rope_types=("default", "yarn"),
        moe=MoEFields(num_experts="num_local_experts", norm_topk_prob=True, fused_expert_params=()),
        extras=gpt_oss_extras,
        tiny_config=TINY,
    )
)
