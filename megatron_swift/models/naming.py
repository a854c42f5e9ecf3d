"""Canonical megatron-core parameter names: global layer/expert indices, spec-independent.

A rank's GPTModel names its parameters with *local* indices (`decoder.layers.0` on pipeline stage
1 is some later global layer; `local_experts.0` on EP rank 1 is a later global expert), and the
Transformer Engine spec names a few parameters differently from the local spec. Mapping rules
are written against the canonical names produced here, so one family declaration serves every
parallel layout and both specs.
"""

from __future__ import annotations

import re

from torch import nn

# Transformer Engine fuses the pre-attention/pre-MLP norms into the following linear.
_TE_ALIASES = (
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (whose state-dict keys carry a `module.` prefix)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _partition_dim(module: nn.Module, param_name: str) -> int | None:
    """The dim along which TP splits this parameter, from the module type.

    Read from the module, not from `param.partition_dim`: megatron-core sets those attributes only
    when it initialises weights, and conversion builds models with initialisation off.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    if param_name == "softmax_offset":  # attention sinks, one per head: split by heads like the query heads
        return 0
    if not param_name.startswith(("weight", "bias")):
        return None  # e.g. Transformer Engine's fused layer_norm_weight
    mode = getattr(module, "parallel_mode", None)  # Transformer Engine linears
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or mode == "column":
        return 0
    if isinstance(module, RowParallelLinear) or mode == "row":
        return 1 if param_name.startswith("weight") else None
    return None


def _checkpointed_tensors(module: nn.Module):
    """A module's parameters and persistent buffers: what its state dict holds (e.g. the MoE router's
    `expert_bias`, a buffer megatron-core updates outside the optimizer and checkpoints with the model)."""
    yield from module.named_parameters(recurse=False)
    for buffer_name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
            yield buffer_name, buffer


def canonical_parameters(model: nn.Module):
    """Yield (canonical_name, tensor, TP partition dim or None) for every parameter and persistent buffer of
    one model chunk on this rank."""
    model = unwrap_model(model)
    layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
    for module_name, module in model.named_modules():
        for param_name, param in _checkpointed_tensors(module):
            name = f"{module_name}.{param_name}" if module_name else param_name
            yield canonical_name(name, layers), param, _partition_dim(module, param_name)


def canonical_name(name: str, layers) -> str:
    name = name.replace(".base_layer.", ".")  # a LoRA-wrapped linear's base weights keep their names
    for pattern, replacement in _TE_ALIASES:
        name = pattern.sub(replacement, name)
    found = _LAYER.match(name)
    if not found:
        return name
    layer = layers[int(found.group(1))]
    rest = name[found.end() :]
    expert_indices = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
    grouped = _GROUPED_EXPERT.search("." + rest)
    if grouped:
        rest = f"mlp.experts.local_experts.{expert_indices[int(grouped.group(2))]}.{grouped.group(1)}.weight"
    else:
        local = _LOCAL_EXPERT.search("." + rest)
        if local:
            global_expert = expert_indices[int(local.group(1))]
            rest = _LOCAL_EXPERT.sub(f".mlp.experts.local_experts.{global_expert}.", "." + rest, count=1)[1:]
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"
