"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): GeGLU (gelu_pytorch_tanh), (1 + w) RMSNorms before
and after attention and MLP, embeddings times sqrt(hidden_size), qk-norm, query_pre_attn_scalar as the softmax
scale, and local / global attention: `layer_types` puts a sliding window on 5 of 6 layers, whose rope has its own
base (`rope_local_base_freq`, rope_parameters.sliding_attention).

The layers megatron-core's spec has no slot for are models/layer_variants.py. Refused, naming the field:
attention / final logit soft-capping (Gemma 3 checkpoints set neither; megatron-core's attention has no
soft-capping), bidirectional attention, attention biases (on o_proj too).
"""

from megatron_swift.config import ConfigError
from megatron_swift.models.families.common import ATTN, DENSE_MLP, EMBEDDINGS, IGNORE_HF, LAYER, QK_NORM
from megatron_swift.models.family import Family, register
from megatron_swift.models.mapping import FusedQKV, Rename, RuleSet

HF_LAYER = "model.layers.{layer}"

RULES = (
    *EMBEDDINGS,
    Rename(f"{LAYER}.input_layernorm.weight", hf_name=f"{HF_LAYER}.input_layernorm.weight"),
    FusedQKV(
        f"{LAYER}.self_attention.linear_qkv.weight",
        q=f"{ATTN}.q_proj.weight",
        k=f"{ATTN}.k_proj.weight",
        v=f"{ATTN}.v_proj.weight",
    ),
    Rename(f"{LAYER}.self_attention.linear_proj.weight", hf_name=f"{ATTN}.o_proj.weight"),
    *QK_NORM,
    Rename(f"{LAYER}.self_attention.output_layernorm.weight", hf_name=f"{HF_LAYER}.post_attention_layernorm.weight"),
    Rename(f"{LAYER}.pre_mlp_layernorm.weight", hf_name=f"{HF_LAYER}.pre_feedforward_layernorm.weight"),
    *DENSE_MLP,
    Rename(f"{LAYER}.mlp.output_layernorm.weight", hf_name=f"{HF_LAYER}.post_feedforward_layernorm.weight"),
)


def gemma3_extras(hf_config, transformer: dict) -> None:
    """Gemma-only fields: the softmax scale, and what megatron-core's attention cannot compute."""
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, name, None) is not None:
            raise ConfigError(f"{name}={getattr(hf_config, name)} is not supported: megatron-core has no soft-capping")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ConfigError("use_bidirectional_attention=true is not supported: training here is causal")
    transformer["softmax_scale"] = float(hf_config.query_pre_attn_scalar) ** -0.5


# google/gemma-3-1b-it config.json, every field kept but `torch_dtype` and `transformers_version` (written by
# save_pretrained) and `cache_implementation` (generation), with the sizes shrunk: 6 layers (one local / global
# period of sliding_window_pattern), a window of 8 tokens (the tests' sequences are longer), head_dim 16 with
# query_pre_attn_scalar 24 (they differ, as in Gemma-3-27B: 128 and 168, so the softmax scale is tested).
GEMMA3_1B_CONFIG = dict(
    attention_bias=False,
    attention_dropout=0.0,
    attn_logit_softcapping=None,
    bos_token_id=2,
    eos_token_id=[1, 106],
    final_logit_softcapping=None,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    hidden_size=1152,
    initializer_range=0.02,
    intermediate_size=6912,
    max_position_embeddings=32768,
    num_attention_heads=4,
    num_hidden_layers=26,
    num_key_value_heads=1,
    pad_token_id=0,
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-06,
    rope_local_base_freq=10000,
    rope_scaling=None,
    rope_theta=1000000,
    sliding_window=512,
    sliding_window_pattern=6,
    use_cache=True,
    vocab_size=262144,
)

TINY = dict(
    GEMMA3_1B_CONFIG,
    bos_token_id=None,  # the tiny tokenizer's ids are set by the tiny-model maker
    eos_token_id=None,
    pad_token_id=None,
    head_dim=16,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=6,
    num_key_value_heads=2,  # GQA with 2 groups, so TP2 splits them (1B has one)
    query_pre_attn_scalar=24,
    sliding_window=8,
    vocab_size=384,
)

GEMMA3 = register(
    Family(
        name="gemma3",
        model_type="gemma3_text",
        architectures=("Gemma3ForCausalLM",),
        mapping=RuleSet(RULES, ignore_hf=IGNORE_HF),
        qk_layernorm=True,
        activations=("gelu_pytorch_tanh",),
        activation_field="hidden_activation",
        zero_centered_norms=True,
        output_norms=True,
        scale_embeddings=True,
        window_layers=True,
        extras=gemma3_extras,
        tiny_config=TINY,
        sequence_classification="Gemma3TextForSequenceClassification",  # Gemma3ForSequenceClassification: VLM
    )
)
