"""`LoraLinear`: a LoRA adapter around one megatron-core (or Transformer Engine) parallel linear.

Sharding follows the base layer, so the adapter adds one small collective at most:

- column-parallel base (output split over TP): A [r, in] replicated, B [out/tp, r] split like the
  base's rows. x -> A is computed on every rank (after the sequence-parallel all-gather when SP is
  on); `copy_to_tensor_model_parallel_region` on the rank-r activation all-reduces its gradient, so
  A's gradient is complete and identical on every TP rank.
- row-parallel base (input split over TP): A [r, in/tp] split like the base's columns, B [out, r]
  replicated. The rank-r partial sums are all-reduced once (`reduce_from_...`), then B runs on every
  rank; under sequence parallelism the result is scattered along the sequence like the base output.
- expert linears with explicit expert communication and expert-TP 1, and TP 1: no collective.

State-dict keys of the base weights do not change (`...linear_qkv.weight`, not
`...linear_qkv.base_layer.weight`), so base weights load from any converted or HF-derived
checkpoint; the adapter adds `...linear_qkv.lora_A.weight` / `lora_B.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE = "base_layer."
ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight")


class LoraError(ValueError):
    """LoRA cannot be applied as configured; the message says what to change."""


def parallel_mode(base: nn.Module) -> str:
    """`column`, `row` or `duplicated`, read from the base layer's type (TE layers say it themselves)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    mode = getattr(base, "parallel_mode", None)
    if isinstance(base, ColumnParallelLinear) or mode == "column":
        return "column"
    if isinstance(base, RowParallelLinear) or mode == "row":
        return "row"
    return "duplicated"


def _group_size(group) -> int:
    return group.size() if group is not None else 1


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout: float):
        """`lora_a` / `lora_b` are this rank's shards, already initialised (see apply.py)."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.base_layer = base
        self.mode = parallel_mode(base)
        self.tp_group = getattr(base, "tp_group", None)
        self.tp_size = _group_size(self.tp_group) if self.mode != "duplicated" else 1
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and self.tp_size > 1
        if self.tp_size > 1 and getattr(base, "explicit_expert_comm", False):
            raise LoraError(
                "LoRA on expert linears split by expert tensor parallelism is not supported; set "
                "parallel.expert_tensor_parallel_size: 1 (experts then stay whole on each expert-parallel rank)"
            )
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Linear(lora_a.shape[1], lora_a.shape[0], bias=False, dtype=lora_a.dtype)
        self.lora_B = nn.Linear(lora_b.shape[1], lora_b.shape[0], bias=False, dtype=lora_b.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
        split = {"column": (self.lora_B.weight, 0), "row": (self.lora_A.weight, 1)}.get(self.mode)
        for param in (self.lora_A.weight, self.lora_B.weight):
            sharded = split is not None and param is split[0] and self.tp_size > 1
            set_tensor_model_parallel_attributes(param, sharded, split[1] if sharded else -1, 1)
            # Expert weights are reduced over the expert-data-parallel group, not the data-parallel one.
            param.allreduce = getattr(base.weight, "allreduce", True)
            if self.mode == "duplicated":  # e.g. MLA's down projections: under SP each rank sees its tokens only
                param.sequence_parallel = getattr(base.weight, "sequence_parallel", False)
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        x = self._normalized_input(x)
        if self.tp_size == 1:
            return self.lora_B(self.lora_A(self.dropout(x))) * self.scale
        group = self.tp_group
        if self.mode == "column":
            if self.sequence_parallel:  # the base gathers the sequence itself; the adapter must too
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
            hidden = mappings.copy_to_tensor_model_parallel_region(self.lora_A(self.dropout(x)), group=group)
            return self.lora_B(hidden) * self.scale
        hidden = mappings.reduce_from_tensor_model_parallel_region(self.lora_A(self.dropout(x)), group=group)
        out = self.lora_B(hidden) * self.scale
        return mappings.scatter_to_sequence_parallel_region(out, group=group) if self.sequence_parallel else out

    def _normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer Engine's LayerNormLinear normalises inside the layer; the adapter sees the same input."""
        norm_weight = getattr(self.base_layer, "layer_norm_weight", None)
        if norm_weight is None:
            return x
        config, eps = self.base_layer.config, getattr(self.base_layer, "eps", 1e-5)
        weight = norm_weight + 1 if config.layernorm_zero_centered_gamma else norm_weight
        if config.normalization == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.layer_norm(x, (x.shape[-1],), weight, getattr(self.base_layer, "layer_norm_bias", None), eps)

    def forward(self, x, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        return out + self.lora_delta(x).to(out.dtype), bias

    # megatron-core reaches into its linears for these (qk-clip reads `linear_qkv.weight`; delayed
    # weight-gradient computation calls `backward_dw`): they concern the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def backward_dw(self) -> None:
        self.base_layer.backward_dw()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axis = {"column": {"lora_B.weight": 0}, "row": {"lora_A.weight": 1}}.get(self.mode, {})
        state.update(
            make_sharded_tensors_for_checkpoint(
                adapter,
                prefix,
                axis if self.tp_size > 1 else {},
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group"),
            )
        )
        return state


def _drop_base_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + BASE)]:
        state_dict[prefix + key[len(prefix + BASE) :]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith((BASE, "lora_A.", "lora_B.")):
            state_dict[prefix + BASE + rest] = state_dict.pop(key)
