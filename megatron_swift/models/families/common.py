"""Building blocks shared by the HF decoder families (Llama-style names); declares no family itself."""

from megatron_swift.models.mapping import FusedGateUp, FusedQKV, PaddedVocab, Rename, RuleSet

ATTN = "model.layers.{layer}.self_attn"
LAYER = "decoder.layers.{layer}"

EMBEDDINGS = (
    PaddedVocab("embedding.word_embeddings.weight", hf_name="model.embed_tokens.weight"),
    PaddedVocab("output_layer.weight", hf_name="lm_head.weight"),
    Rename("decoder.final_layernorm.weight", hf_name="model.norm.weight"),
)

ATTENTION = (
    Rename(f"{LAYER}.input_layernorm.weight", hf_name="model.layers.{layer}.input_layernorm.weight"),
    FusedQKV(
        f"{LAYER}.self_attention.linear_qkv.weight",
        q=f"{ATTN}.q_proj.weight",
        k=f"{ATTN}.k_proj.weight",
        v=f"{ATTN}.v_proj.weight",
    ),
    FusedQKV(
        f"{LAYER}.self_attention.linear_qkv.bias",
        q=f"{ATTN}.q_proj.bias",
        k=f"{ATTN}.k_proj.bias",
        v=f"{ATTN}.v_proj.bias",
    ),
    Rename(f"{LAYER}.self_attention.linear_proj.weight", hf_name=f"{ATTN}.o_proj.weight"),
    Rename(f"{LAYER}.pre_mlp_layernorm.weight", hf_name="model.layers.{layer}.post_attention_layernorm.weight"),
)

QK_NORM = (
    Rename(f"{LAYER}.self_attention.q_layernorm.weight", hf_name=f"{ATTN}.q_norm.weight"),
    Rename(f"{LAYER}.self_attention.k_layernorm.weight", hf_name=f"{ATTN}.k_norm.weight"),
)

DENSE_MLP = (
    FusedGateUp(
        f"{LAYER}.mlp.linear_fc1.weight",
        gate="model.layers.{layer}.mlp.gate_proj.weight",
        up="model.layers.{layer}.mlp.up_proj.weight",
    ),
    Rename(f"{LAYER}.mlp.linear_fc2.weight", hf_name="model.layers.{layer}.mlp.down_proj.weight"),
)

# Rotary tables some exporters save; they are recomputed from the config.
IGNORE_HF = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)

DENSE_DECODER = RuleSet(EMBEDDINGS + ATTENTION + DENSE_MLP, ignore_hf=IGNORE_HF)

TINY_DENSE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def routed_experts(router: str, expert: str, gate: str, up: str, down: str) -> tuple:
    """Router + per-expert SwiGLU rules; HF names are given under the `{layer}` / `{expert}` templates."""
    mcore_expert = f"{LAYER}.mlp.experts.local_experts.{{expert}}"
    return (
        Rename(f"{LAYER}.mlp.router.weight", hf_name=router),
        FusedGateUp(f"{mcore_expert}.linear_fc1.weight", gate=f"{expert}.{gate}", up=f"{expert}.{up}"),
        Rename(f"{mcore_expert}.linear_fc2.weight", hf_name=f"{expert}.{down}"),
    )
