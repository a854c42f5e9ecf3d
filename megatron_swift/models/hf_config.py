"""HF `PretrainedConfig` -> megatron-core model arguments, for the decoder families we declare.

Pure translation: no model is built here. Every HF field that changes the computation is either
translated or refused with a message that names it; nothing is silently dropped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_swift.config import ConfigError
from megatron_swift.models.family import Family, family_for
from megatron_swift.models.mapping import ModelDims, RuleSet
from megatron_swift.models.mla import mla_args
from megatron_swift.models.moe_args import moe_args

# megatron-core's RotaryEmbedding._apply_scaling takes only the factor and hard-codes these.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class GPTModelArgs:
    """Everything needed to build a megatron-core GPTModel equivalent to an HF model."""

    family: Family
    transformer: dict  # TransformerConfig keyword arguments (parallel sizes are added by the builder)
    vocab_size: int
    padded_vocab_size: int
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    rotary_base: float = 10000.0  # GPTModel's rope (standard attention; MLA's rope is in `transformer`)
    rotary_percent: float = 1.0
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    seq_len_interpolation_factor: float | None = None
    # GPTModel's position embedding: "rope", or "yarn" (standard attention with YaRN; its settings are the
    # `yarn_*` attributes the builder sets on the TransformerConfig, which megatron-core reads with getattr).
    position_embedding_type: str = "rope"
    yarn: dict = field(default_factory=dict)
    # HF sliding window not built into the model (families without `window_layers`): sequences must stay within it.
    sliding_window: int | None = None
    # Gemma-style layers (models/layer_variants.py): embeddings times this, output norms, the sliding-window
    # layers' own rope base (None: every layer uses GPTModel's rope).
    embedding_multiplier: float | None = None
    output_norms: bool = False
    window_rotary_base: float | None = None
    # A reward model (models/reward.py): the `score` head on the last hidden state instead of the output layer;
    # the pad token id its reward position is found with (HF's config.pad_token_id).
    reward_head: bool = False
    pad_token_id: int | None = None
    # A vision-language model (models/vlm.py): the tower's HF vision sub-config (`to_dict()`), and the placeholder
    # token ids its image / video features replace. The decoder fields above are the text sub-config's.
    vision_config: dict | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def vision(self):
        """The family's `VisionTower`, or None for a text-only model."""
        return self.family.vision

    @property
    def mapping(self) -> RuleSet:
        """The family's rules, plus the reward head's for a reward model."""
        return _with_reward_head(self.family.mapping) if self.reward_head else self.family.mapping

    @property
    def dims(self) -> ModelDims:
        t = self.transformer
        return ModelDims(
            num_attention_heads=t["num_attention_heads"],
            num_query_groups=t["num_query_groups"],
            head_dim=t["kv_channels"],
            vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size,
        )

    @property
    def num_layers(self) -> int:
        return self.transformer["num_layers"]

    @property
    def is_mla(self) -> bool:
        return bool(self.transformer.get("multi_latent_attention"))

    @property
    def is_moe(self) -> bool:
        return bool(self.transformer.get("num_moe_experts"))


@functools.lru_cache
def _with_reward_head(rules: RuleSet) -> RuleSet:
    from megatron_swift.models.reward import REWARD_HEAD

    return RuleSet((*rules.rules, REWARD_HEAD), ignore_hf=rules.ignore_hf, hf_aliases=rules.hf_aliases)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def rope_parameters(hf_config) -> dict:
    """Rope settings under transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


def _translate_rope(hf_config, rope: dict, args: dict) -> None:
    """Rope of standard attention: GPTModel's rotary embedding arguments into `args`."""
    args["rotary_base"] = float(rope["rope_theta"])
    partial = float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        # HF rotates the first int(head_dim * factor) dims of each head; megatron's rotary_percent the same.
        args["rotary_percent"] = partial
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return
    if rope_type == "linear":
        args["seq_len_interpolation_factor"] = float(rope["factor"])
    elif rope_type == "llama3":
        for key, fixed in _MCORE_LLAMA3_FIXED.items():
            if float(rope.get(key, fixed)) != fixed:
                raise ConfigError(
                    f"rope_parameters.{key}={rope[key]} is not supported: megatron-core's llama3 rope scaling "
                    f"fixes it to {fixed}"
                )
        args["rope_scaling"] = True
        args["rope_scaling_factor"] = float(rope["factor"])
    elif rope_type == "yarn":
        args.update(_standard_yarn(hf_config, rope, partial))
    else:  # a family declared a rope type standard attention has no translation for
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported with standard attention")


def _standard_yarn(hf_config, rope: dict, partial: float) -> dict:
    """HF's YaRN (`_compute_yarn_parameters`) as megatron-core's YarnRotaryEmbedding + its cos/sin scale
    (`_yarn_get_concentration_factor_from_config`). HF scales cos/sin by mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are set (non-zero), else by mscale(factor); megatron-core the same
    when both are set (not None), so unset or zero ones are passed as None."""
    if partial != 1.0:
        raise ConfigError(
            f"partial_rotary_factor={partial} with rope_type='yarn' is not supported: megatron-core's YaRN rotates "
            "the whole head"
        )
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise ConfigError("rope_parameters.original_max_position_embeddings is required with rope_type='yarn'")
    factor = float(rope.get("factor") or hf_config.max_position_embeddings / original)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    both = bool(mscale and mscale_all_dim)
    if rope.get("attention_factor") is not None:
        raise ConfigError(
            f"rope_parameters.attention_factor={rope['attention_factor']} is not supported: megatron-core derives "
            "the cos/sin scale from factor / mscale / mscale_all_dim"
        )
    return dict(
        position_embedding_type="yarn",
        yarn=dict(
            yarn_rotary_scaling_factor=factor,
            yarn_original_max_position_embeddings=int(original),
            yarn_beta_fast=float(rope.get("beta_fast") or 32),
            yarn_beta_slow=float(rope.get("beta_slow") or 1),
            yarn_mscale=float(mscale) if both else None,
            yarn_mscale_all_dim=float(mscale_all_dim) if both else None,
            # HF floors / ceils the correction range unless `truncate` is false (gpt-oss).
            yarn_correction_range_round_to_int=bool(rope.get("truncate", True)),
        ),
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's `gelu_pytorch_tanh` (GeGLU's gate activation in Gemma)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}
LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_declared(hf_config, family: Family, rope: dict) -> None:
    """What the family's configs may name: activation and rope type."""
    act = getattr(hf_config, family.activation_field, "silu")
    if act not in family.activations:
        raise ConfigError(
            f"{family.activation_field}={act!r} is not supported for {family.name}; supported: "
            f"{', '.join(family.activations)}"
        )
    if rope["rope_type"] not in family.rope_types:
        raise ConfigError(
            f"rope_parameters.rope_type={rope['rope_type']!r} is not supported for {family.name}; supported: "
            f"{', '.join(family.rope_types)}"
        )


def _window_layers(hf_config, transformer: dict) -> tuple[dict, float | None]:
    """`layer_types` + `sliding_window` -> megatron's window_size / window_attn_skip_freq in `transformer`; returns
    the full-attention layers' rope and the sliding-window layers' rope base (None when they share one rope).

    HF's window keeps keys with query - key < sliding_window; megatron's (left, 0) keeps query - key <= left."""
    layer_types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers)
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown or len(layer_types) != hf_config.num_hidden_layers:
        raise ConfigError(
            f"layer_types={layer_types}: one of {', '.join(LAYER_TYPES)} per layer (num_hidden_layers="
            f"{hf_config.num_hidden_layers}) is supported"
        )
    if "sliding_attention" in layer_types:
        window = getattr(hf_config, "sliding_window", None)
        if not window or int(window) < 1:
            raise ConfigError(f"layer_types has sliding_attention layers but sliding_window={window!r}")
        transformer["window_size"] = (int(window) - 1, 0)
        transformer["window_attn_skip_freq"] = [int(kind == "sliding_attention") for kind in layer_types]
    per_type = getattr(hf_config, "rope_parameters", None) or {}
    if "full_attention" not in per_type:
        return rope_parameters(hf_config), None
    local = dict(per_type.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ConfigError(
            f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is not supported: the sliding-window "
            "layers' own rope is the default one"
        )
    full = dict(per_type["full_attention"])
    full.setdefault("rope_type", "default")
    return full, float(local.get("rope_theta", full["rope_theta"]))


def _vision_fields(top_config, family: Family) -> dict:
    """A vision-language config: the tower's sub-config and the placeholder token ids (GPTModelArgs fields)."""
    tower = family.vision
    vision = getattr(top_config, tower.config_field, None)
    if vision is None:
        raise ConfigError(f"{tower.config_field} is missing: {family.name} needs its vision tower's config")
    fields = {"vision_config": vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)}
    for key, field_name in (("image_token_id", tower.image_token_field), ("video_token_id", tower.video_token_field)):
        if field_name is not None:
            fields[key] = getattr(top_config, field_name)
    return fields


def _mrope(rope: dict, head_dim: int, args: dict, transformer: dict) -> None:
    """Multimodal rope (a `mrope_section` in the rope parameters): megatron-core's mrope, positions [3, b, s]."""
    sections = rope.get("mrope_section")
    if sections is None:
        return
    sections = [int(s) for s in sections]
    if len(sections) != 3 or sum(sections) * 2 != head_dim:
        raise ConfigError(
            f"rope_parameters.mrope_section={sections}: three sections (temporal, height, width) summing to "
            f"head_dim / 2 = {head_dim // 2} are supported"
        )
    if args.get("rotary_percent", 1.0) != 1.0 or rope["rope_type"] != "default":
        raise ConfigError(
            f"rope_parameters.mrope_section with rope_type={rope['rope_type']!r} / partial rotation is not supported: "
            "megatron-core's mrope is the default rope per section"
        )
    args["position_embedding_type"] = "mrope"
    transformer["mrope_section"] = sections


def translate(hf_config, *, make_vocab_size_divisible_by: int = 128) -> GPTModelArgs:
    """Translate an HF config of a supported family into megatron-core model arguments."""
    family = family_for(hf_config)
    top_config = hf_config
    if family.vision is not None:  # the decoder is the text sub-config; tying and token ids are top-level fields
        hf_config = getattr(top_config, family.vision.text_config_field)
    window_transformer: dict = {}
    window_rotary_base = None
    if family.window_layers:
        rope, window_rotary_base = _window_layers(hf_config, window_transformer)
    else:
        rope = rope_parameters(hf_config)
    _check_declared(hf_config, family, rope)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    qkv_bias, qk_norm, linear_bias = (
        bool(getattr(hf_config, flag, False)) if isinstance(flag, str) else flag
        for flag in (family.qkv_bias, family.qk_layernorm, family.linear_bias)
    )
    if getattr(hf_config, "attention_bias", False) and "attention_bias" not in (family.qkv_bias, family.linear_bias):
        # Llama-style attention_bias puts a bias on o_proj as well; megatron-core only offers a bias
        # on every linear (add_bias_linear, MLP included) or on q/k/v alone (add_qkv_bias).
        raise ConfigError(
            "attention_bias=true (biases on q/k/v/o_proj) is not supported: megatron-core cannot bias "
            "o_proj without biasing the MLP too"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ConfigError("mlp_bias=true is not supported by the declared families' mappings")
    transformer = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        layernorm_zero_centered_gamma=family.zero_centered_norms,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[getattr(hf_config, family.activation_field, "silu")],
        add_bias_linear=linear_bias,
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )
    transformer.update(window_transformer)
    if family.attention_sinks:
        transformer["softmax_type"] = "learnable"
    if family.moe is not None:
        transformer.update(moe_args(hf_config, family.moe))
    rope_kwargs: dict = {}
    if family.attention == "mla":
        transformer.update(mla_args(hf_config, rope))
    elif family.attention == "standard":
        _translate_rope(hf_config, rope, rope_kwargs)
        _mrope(rope, head_dim, rope_kwargs, transformer)
        if family.vision is not None and family.vision.mrope and "mrope_section" not in transformer:
            raise ConfigError(
                f"rope_parameters.mrope_section is missing: {family.name}'s decoder uses multimodal rope; give the "
                "checkpoint's sections (temporal, height, width)"
            )
    else:
        raise ValueError(f"family {family.name}: unknown attention kind {family.attention!r}")
    if family.extras is not None:
        family.extras(hf_config, transformer)
    vocab = hf_config.vocab_size
    sliding = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False or family.window_layers:
        sliding = None  # window_layers: built into the model
    args = GPTModelArgs(
        family=family,
        transformer=transformer,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, make_vocab_size_divisible_by),
        max_sequence_length=hf_config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(getattr(top_config, "tie_word_embeddings", False)),
        sliding_window=sliding,
        embedding_multiplier=hf_config.hidden_size**0.5 if family.scale_embeddings else None,
        output_norms=family.output_norms,
        window_rotary_base=window_rotary_base if "window_size" in transformer else None,
        **rope_kwargs,
        **_reward_fields(top_config, family),
        **(_vision_fields(top_config, family) if family.vision is not None else {}),
    )
    if sliding and sliding < args.max_sequence_length:
        args.notes.append(
            f"sliding_window={sliding}: megatron-core's attention here is full causal, which is exact only for "
            f"sequences of at most {sliding} tokens"
        )
    return args


def _reward_fields(hf_config, family: Family) -> dict:
    """A `*ForSequenceClassification` config (an exported reward model) translates to a reward model."""
    if family.reward_architecture not in (getattr(hf_config, "architectures", None) or []):
        return {}
    num_labels = getattr(hf_config, "num_labels", 1)
    if num_labels != 1:
        raise ConfigError(f"num_labels={num_labels}: {family.reward_architecture} checkpoints are read as reward "
                          "models (num_labels 1) only")  # fmt: skip
    return {"reward_head": True, "pad_token_id": getattr(hf_config, "pad_token_id", None)}


def dtype_from_name(name: str) -> torch.dtype:
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]
