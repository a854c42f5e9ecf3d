"""Model families: what a family declares, and the registry that finds one for an HF config.

A family is data: the HF `architectures` it covers, its parameter mapping (`RuleSet`), which
optional features it reads from the HF config (qkv bias, qk-norm, MoE field names) and a tiny
config for tests and examples. Adding a family means adding one file under `families/`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

from megatron_swift.models.mapping import RuleSet


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


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # HF config `model_type`
    architectures: tuple[str, ...]
    mapping: RuleSet
    # q/k/v projections carry a bias (and o_proj does not): megatron's add_qkv_bias.
    qkv_bias: bool = False
    qk_layernorm: bool = False
    moe: MoEFields | None = None
    # Keyword arguments for the HF config class that make a tiny, fast test model.
    tiny_config: dict = field(default_factory=dict)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    for arch in family.architectures:
        if arch in _REGISTRY:
            raise ValueError(f"architecture {arch} declared twice ({_REGISTRY[arch].name}, {family.name})")
        _REGISTRY[arch] = family
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
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise UnsupportedModelError(
        f"unsupported architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
