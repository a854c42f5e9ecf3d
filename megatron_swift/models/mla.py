"""Multi-latent attention (DeepSeek-V2/V3 MLA): HF config fields -> megatron-core `MLATransformerConfig` arguments.

A generic capability: a family declares `attention="mla"` and this module reads the HF MLA fields every
MLA config uses (`q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`,
`rope_interleave`, the rope parameters). megatron-core's MLA applies its rotary embedding inside the
attention (GPTModel builds none), so the rope, YaRN included, is part of the transformer arguments.

Equivalences relied on (checked by the logits tests against HF):
- HF `q_a_proj` / `q_a_layernorm` / `q_b_proj` (or `q_proj`), `kv_a_proj_with_mqa` ([latent; rope key]),
  `kv_a_layernorm`, `kv_b_proj` (per head [k_nope; v]) are megatron's `linear_q_down_proj` / `q_layernorm` /
  `linear_q_up_proj` (`linear_q_proj`), `linear_kv_down_proj`, `kv_layernorm`, `linear_kv_up_proj` with the
  same row orders, so each is a plain rename;
- HF's `rope_interleave=True` rotates interleaved pairs; megatron's MLA de-interleaves before rotating
  (`multi_latent_attention` in its rope helper), the same computation. `rope_interleave=False` is refused;
- YaRN: HF's softmax scale `mscale(factor, mscale_all_dim)^2 / sqrt(q_head_dim)` and cos/sin scale
  `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` are megatron's. HF falls back to
  `mscale(factor)` for the cos/sin scale when `mscale` or `mscale_all_dim` is 0 / unset, megatron only when
  unset: such configs are refused unless the two agree.
"""

from __future__ import annotations

import math

from megatron_swift.config import ConfigError

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_args(hf_config, rope: dict) -> dict:
    """TransformerConfig keyword arguments for MLA from an HF config and its rope parameters."""
    missing = [name for name in MLA_FIELDS if not hasattr(hf_config, name)]
    if missing:
        raise ConfigError(f"multi-latent attention needs {', '.join(missing)} in config.json")
    if getattr(hf_config, "rope_interleave", True) is False:
        raise ConfigError(
            "rope_interleave=false is not supported: megatron-core's MLA rotates the rope dimensions as "
            "interleaved pairs (rope_interleave=true, as DeepSeek's checkpoints)"
        )
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        raise ConfigError(
            f"num_key_value_heads={kv_heads}: multi-latent attention expands keys and values per head; "
            f"it must equal num_attention_heads={heads}"
        )
    args = dict(
        multi_latent_attention=True,
        q_lora_rank=hf_config.q_lora_rank,
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_head_dim=hf_config.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf_config.qk_rope_head_dim,
        v_head_dim=hf_config.v_head_dim,
        # megatron's local core attention sizes its output by kv_channels: the value head size here.
        kv_channels=hf_config.v_head_dim,
        num_query_groups=heads,
        # Builds the q / kv latent norms (q_a_layernorm, kv_a_layernorm) in the local and TE specs.
        qk_layernorm=True,
        rotary_base=float(rope["rope_theta"]),
    )
    rope_type = rope["rope_type"]
    if rope_type == "default":
        args.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    elif rope_type == "yarn":
        original = rope.get("original_max_position_embeddings") or hf_config.max_position_embeddings
        # HF derives a missing factor from the context extension, as DeepSeek's remote code did.
        factor = float(rope.get("factor") or hf_config.max_position_embeddings / original)
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if not (mscale and mscale_all_dim) and _yarn_mscale(factor, mscale or 1.0) / _yarn_mscale(
            factor, mscale_all_dim or 0.0
        ) != _yarn_mscale(factor):
            raise ConfigError(
                f"rope_parameters mscale={mscale}, mscale_all_dim={mscale_all_dim}: HF then scales cos/sin by "
                "mscale(factor) and megatron-core by their ratio; set both (as DeepSeek-V3 does)"
            )
        if rope.get("attention_factor") is not None:
            raise ConfigError("rope_parameters.attention_factor is not supported with MLA: megatron-core derives it")
        if rope.get("truncate", True) is False:
            raise ConfigError("rope_parameters.truncate=false is not supported: megatron-core rounds YaRN's range")
        args.update(
            rope_type="yarn",
            rotary_scaling_factor=factor,
            original_max_position_embeddings=int(original),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(mscale if mscale is not None else 1.0),
            mscale_all_dim=float(mscale_all_dim or 0.0),
        )
    else:
        raise ConfigError(
            f"rope_parameters.rope_type={rope_type!r} is not supported with MLA; supported: default, yarn"
        )
    return args


def mla_layout_problems(transformer: dict, tp: int) -> list[str]:
    """megatron-core's local spec splits the MLA down projections' outputs over TP."""
    found = []
    if transformer.get("q_lora_rank") and transformer["q_lora_rank"] % tp:
        found.append(f"q_lora_rank={transformer['q_lora_rank']} is not divisible by tensor parallel {tp}")
    kv_down = transformer["kv_lora_rank"] + transformer["qk_pos_emb_head_dim"]
    if kv_down % tp:
        found.append(f"kv_lora_rank + qk_rope_head_dim = {kv_down} is not divisible by tensor parallel {tp}")
    return found


def use_duplicated_down_projections(block_spec) -> None:
    """Local spec: MLA's q / kv down projections as megatron-core's duplicated `Linear` (whole on every TP rank),
    the layout its Transformer Engine spec uses (`TELinear`, parallel_mode duplicated).

    Why: megatron-core 0.16's local spec builds them column-parallel, gathers their outputs over TP and takes the
    rope key (`k_pos_emb`) from the gathered tensor; the gather's backward keeps each rank's slice without
    summing, so the rope key's gradient holds only the heads of the rank that owns those columns (TP2 + SP: step-1
    gradient norm 6.6754 instead of 6.6718). Duplicated, megatron-core gathers the rope key over the sequence,
    whose backward reduce-scatters the heads' gradients, and tags the weights `sequence_parallel` so their
    gradients are all-reduced over TP. Forward results are the same either way."""
    from megatron.core.post_training.modelopt.layers import Linear

    for layer_spec in block_spec.layer_specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is not None and hasattr(submodules, "linear_kv_down_proj"):
            submodules.linear_q_down_proj = Linear
            submodules.linear_kv_down_proj = Linear
