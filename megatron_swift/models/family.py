"""Model families: what a family declares, and the registry that finds one for an HF config.

A family is data: the HF `architectures` it covers (and its reward model's), its parameter mapping (`RuleSet`),
and what differs from a Llama decoder (the defaults): qkv bias, qk-norm, attention kind (standard or
multi-latent), the activations and rope types its configs may name, its MoE fields and router kind,
its LoRA target names, an optional hook for config fields only it has, and an optional vision tower
(`VisionTower`: a vision-language model whose language model is the family's decoder). Plus a tiny config for
tests and examples. Adding a family means adding one file under `families/`; what a hook or a kind
needs from megatron-core is translated generically (hf_config.py, mla.py), never by family name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_swift.models.mapping import RuleSet

# megatron-core linears of a standard (Llama) decoder layer, the LoRA targets `all-linear` names.
STANDARD_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# Multi-latent attention's linears (q projected directly without q_lora_rank, else down + up).
MLA_LINEARS = (
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_proj",
    "linear_fc1",
    "linear_fc2",
)


class UnsupportedModelError(ValueError):
    """The HF checkpoint is of a family megatron-swift does not know."""


@dataclass(frozen=True)
class MoEFields:
    """Where an HF config keeps its MoE settings (names differ between families)."""

    num_experts: str
    top_k: str = "num_experts_per_tok"
    expert_ffn_hidden_size: str = "intermediate_size"
    aux_loss_coeff: str = "router_aux_loss_coef"
    # HF field holding "renormalise the top-k routing weights", or a constant when the family fixes it.
    norm_topk_prob: str | bool = True
    # Qwen-MoE style dense/sparse interleave (`decoder_sparse_step`, `mlp_only_layers`).
    sparse_step: str | None = None
    dense_layers: str | None = None
    # Always-on shared expert (Qwen2-MoE): its FFN width field, and whether a sigmoid gate scales it.
    shared_expert_ffn_hidden_size: str | None = None
    shared_expert_gate: bool = False
    # transformers >= 5 holds the routed experts as 3-D parameters of the `experts` module (on disk they
    # stay per expert): megatron-core expert linear -> that parameter. PEFT adapters address them through
    # `target_parameters`; each expert's slice is the linear's weight as is ([gate; up] for linear_fc1).
    fused_expert_params: tuple[tuple[str, str], ...] = (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj"))
    # Router kind. "softmax" (Mixtral / Qwen) or "sigmoid" (DeepSeek-V3: sigmoid scores, top-k chosen on
    # scores + a per-expert bias, weights renormalised and scaled).
    score_function: str = "softmax"
    # The router carries a per-expert routing bias (HF `e_score_correction_bias`: megatron's expert_bias).
    expert_bias: bool = False
    # Group-limited top-k (HF field names): experts in `num_groups` groups, tokens routed within the best
    # `group_topk` groups.
    num_groups: str | None = None
    group_topk: str | None = None
    # HF field scaling the routed experts' weights (DeepSeek's routed_scaling_factor).
    topk_scaling_factor: str | None = None
    # HF field: the first N layers have a dense MLP (DeepSeek's first_k_dense_replace).
    first_dense_layers: str | None = None
    # HF field: number of always-on shared experts of `expert_ffn_hidden_size` each (DeepSeek's
    # n_shared_experts), the alternative to `shared_expert_ffn_hidden_size`.
    shared_expert_count: str | None = None


@dataclass(frozen=True)
class VisionTower:
    """A vision encoder in front of the decoder (models/vlm.py): HF's own module, built from the config's vision
    sub-config, replicated over tensor parallelism, on the first pipeline stage only. Its image / video features
    replace the embeddings of the placeholder tokens the config names.

    The decoder is described by the config's text sub-config (`text_config`); the family's rules map the tower's
    parameters (models/mapping.py `{path}` renames) under `module_name` in megatron-core names."""

    # Importable HF class of the tower (patch embedding, blocks, patch merger), constructed from the vision config.
    hf_class: str
    # Attribute of the model holding the tower (megatron-core side: parameters named `<module_name>.*`).
    module_name: str = "vision_model"
    config_field: str = "vision_config"
    text_config_field: str = "text_config"
    # Config fields naming the placeholder token ids of images and videos (None: the modality is not supported).
    image_token_field: str = "image_token_id"
    video_token_field: str | None = "video_token_id"
    # Submodules of the tower that are the aligner (ms-swift's freeze_aligner / aligner_lr: the projection into the
    # decoder's width, Qwen2.5-VL's patch merger); the rest of the tower is the ViT (training/vision_tuning.py).
    aligner_modules: tuple[str, ...] = ("merger",)
    # The decoder's rope is multimodal (positions [3, b, s], models/rope_index.py): the text config's
    # `rope_parameters.mrope_section` is then required (HF would fall back to a default split silently).
    mrope: bool = True
    # The multimodal rope's frequency channels are interleaved over t / h / w (Qwen3-VL's `apply_interleaved_mrope`:
    # channel i is height's for i = 1 mod 3 and width's for i = 2 mod 3 within their sections, temporal's otherwise)
    # rather than chunked (Qwen2.5-VL, megatron-core's `MultimodalRotaryEmbedding`); models/vlm.py.
    interleaved_mrope: bool = False
    # Videos are positioned frame by frame, each temporal patch as an image of its own (Qwen3-VL separates frames by
    # timestamp text tokens) rather than with time positions scaled by `tokens_per_second` (models/rope_index.py).
    per_frame_video_positions: bool = False
    # Vision config field listing the tower blocks whose features (through their own mergers: HF's DeepStack) are
    # added to the decoder's hidden states at the visual tokens after the first len(list) decoder layers (vlm.py).
    deepstack_field: str | None = None
    # Special tokens a tiny test tokenizer gets, as (config field naming its id, token text).
    special_tokens: tuple[tuple[str, str], ...] = ()

    def build(self, vision_config: dict, dtype):
        """The HF tower module for a vision sub-config (as `to_dict()` gives it), in `dtype`."""
        module_name, class_name = self.hf_class.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        config = cls.config_class.from_dict(vision_config)
        # sdpa: the tower's attention is bidirectional within each window / image; the math is HF's either way.
        return cls._from_config(config, attn_implementation="sdpa").to(dtype)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # HF config `model_type`
    architectures: tuple[str, ...]
    mapping: RuleSet
    # q/k/v projections carry a bias (and o_proj does not): megatron's add_qkv_bias. A string names the HF
    # field that says so (GLM-4.5's `attention_bias` biases q/k/v only, Llama's biases o_proj too: refused).
    qkv_bias: bool | str = False
    # Per-head RMSNorm on q and k; a string names the HF field that switches it (GLM-4.5's `use_qk_norm`).
    qk_layernorm: bool | str = False
    # Every linear carries a bias (q/k/v, o_proj, experts, router: megatron's add_bias_linear); a string names the
    # HF field that says so (gpt-oss's `attention_bias`).
    linear_bias: bool | str = False
    # A learned per-head logit in every softmax's denominator (gpt-oss's `sinks`: megatron's softmax_type
    # "learnable", the core attention's `softmax_offset`).
    attention_sinks: bool = False
    moe: MoEFields | None = None
    # "standard" (q/k/v fused into linear_qkv) or "mla" (multi-latent attention: models/mla.py).
    attention: str = "standard"
    # HF activation values the family's gated MLP may use (megatron-core's gated linear unit), and the config
    # field naming it (Gemma's `hidden_activation`).
    activations: tuple[str, ...] = ("silu",)
    activation_field: str = "hidden_act"
    # Gemma-style layers (models/layer_variants.py): RMSNorms scaling by (1 + weight); norms on the attention and
    # MLP outputs before the residual add; embeddings multiplied by sqrt(hidden_size).
    zero_centered_norms: bool = False
    output_norms: bool = False
    scale_embeddings: bool = False
    # The config's `layer_types` choose sliding-window (`sliding_window`) or full attention per layer, and
    # `rope_parameters` may hold one rope per layer type (models/hf_config.py).
    window_layers: bool = False
    # HF rope types the family's configs may name (models/hf_config.py translates each).
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    # megatron-core linears LoRA's `all-linear` targets.
    lora_linears: tuple[str, ...] = STANDARD_LINEARS
    # Family-only config fields: `extras(hf_config, transformer_kwargs)` validates them (raising ConfigError
    # naming the field) and adds TransformerConfig arguments; pure, no side effects.
    extras: Callable | None = None
    # Keyword arguments for the HF config class that make a tiny, fast test model.
    tiny_config: dict = field(default_factory=dict)
    # A vision-language family's vision encoder; its decoder is then described by the config's text sub-config.
    vision: VisionTower | None = None
    # The HF reward-model (sequence classification) architecture, when it is not the generic rule's
    # (`XForCausalLM` -> `XForSequenceClassification`), e.g. Gemma 3's text model.
    sequence_classification: str | None = None

    @property
    def reward_architecture(self) -> str:
        """The HF `*ForSequenceClassification` class of this family's reward models (train.task rm)."""
        causal = self.architectures[0]
        return self.sequence_classification or causal.removesuffix("ForCausalLM") + "ForSequenceClassification"


_REGISTRY: dict[str, Family] = {}


_REWARD_REGISTRY: dict[str, Family] = {}  # reward-model (sequence classification) architectures


def register(family: Family) -> Family:
    for arch in family.architectures:
        if arch in _REGISTRY:
            raise ValueError(f"architecture {arch} declared twice ({_REGISTRY[arch].name}, {family.name})")
        _REGISTRY[arch] = family
    _REWARD_REGISTRY[family.reward_architecture] = family
    return family


def _load_all() -> None:
    import megatron_swift.models.families as pkg

    for module in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{module.name}")


def all_families() -> dict[str, Family]:
    """Every registered family by name."""
    _load_all()
    return {family.name: family for family in _REGISTRY.values()}


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def family_for(hf_config) -> Family:
    """The family declared for `hf_config.architectures`, or a clear error listing the supported ones."""
    _load_all()
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        found = _REGISTRY.get(arch) or _REWARD_REGISTRY.get(arch)
        if found is not None:
            return found
    raise UnsupportedModelError(
        f"unsupported architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
