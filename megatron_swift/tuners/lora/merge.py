"""Merge LoRA adapters into their base weights: pure functions, and in place on a model.

Every shard merges locally (column: W[out/tp, in] + B[out/tp, r] A[r, in]; row:
W[out, in/tp] + B[out, r] A[r, in/tp]), so merging needs no collective at any layout. DoRA
(W' = m / ||W + s B A|| * (W + s B A), row norms) needs the full row norms: a row-parallel shard gets
them from `LoraLinear.weight_norm` (one all-reduce).
"""

from __future__ import annotations

import torch

from megatron_swift.models.naming import unwrap_model
from megatron_swift.tuners.lora.layers import LoraLinear, adapted_weight


def merged_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """W + scale * B A; with a DoRA `magnitude`, rescaled per row to m / ||W + scale * B A||, the norm
    computed here from whole rows unless given (`norm`: the full row norms of a row-parallel shard)."""
    adapted = adapted_weight(weight, lora_a, lora_b, scale)
    if magnitude is not None:
        norm = adapted.square().sum(dim=1).sqrt() if norm is None else norm.float()  # as LoraLinear.weight_norm
        adapted = adapted * (magnitude.float() / norm).unsqueeze(1)
    return adapted.to(weight.dtype)


def unmerged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (weight.float() - delta).to(weight.dtype)


@torch.no_grad()
def merge_lora(chunks) -> int:
    """Fold every adapter into its base weight and put the base layer back in its place; returns the count."""
    merged = 0
    for chunk in chunks:
        model = unwrap_model(chunk)
        wrappers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLinear)]
        for name, wrapper in wrappers:
            base = wrapper.base_layer
            magnitude = wrapper.lora_magnitude_vector
            norm = wrapper.weight_norm() if magnitude is not None else None
            base.weight.copy_(merged_weight(base.weight, wrapper.lora_A.weight, wrapper.lora_B.weight, wrapper.scale,
                                            magnitude, norm))  # fmt: skip
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
            merged += 1
    return merged
