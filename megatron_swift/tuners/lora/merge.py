"""Merge LoRA adapters into their base weights: pure functions, and in place on a model.

Every shard merges locally (column: W[out/tp, in] + B[out/tp, r] A[r, in]; row:
W[out, in/tp] + B[out, r] A[r, in/tp]), so merging needs no collective at any layout.
"""

from __future__ import annotations

import torch

from megatron_swift.models.naming import unwrap_model
from megatron_swift.tuners.lora.layers import LoraLinear


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (weight.float() + delta).to(weight.dtype)


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
            base.weight.copy_(merged_weight(base.weight, wrapper.lora_A.weight, wrapper.lora_B.weight, wrapper.scale))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
            merged += 1
    return merged
