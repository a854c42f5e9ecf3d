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

DoRA (`magnitude` given; PEFT's semantics for nn.Linear): the output is rescaled per output feature
by m / ||W + scale * B A|| (row norms, detached as in the DoRA paper and PEFT), i.e.
base + (m / norm - 1) * W x + (m / norm) * scale * B A x. The magnitude m (`lora_magnitude_vector`)
is sharded like the base output: column-parallel -> this rank's rows; row-parallel -> the full output,
replicated, and the row norms need the squared sums of every TP rank's input columns (one all-reduce
of an [out] vector). Under sequence parallelism a row-parallel output is split along the sequence, so
m's gradient is partial per rank and megatron-core sums it (the `sequence_parallel` attribute, as for
layer norms). With dropout in training, PEFT computes W x and B A x from the same dropped input (a
second matmul with the base weight); otherwise W x is the base output without its bias.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

BASE = "base_layer."
MAGNITUDE = "lora_magnitude_vector"
ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight", MAGNITUDE)


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
    def __init__(
        self,
        base: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        dropout: float,
        use_dora: bool = False,
        magnitude: torch.Tensor | None = None,
    ):
        """`lora_a` / `lora_b` are this rank's shards, already initialised (see apply.py). With `use_dora`,
        `magnitude` is this rank's shard of the DoRA magnitude; None: PEFT's start, the row norms of
        W + scale * B A (a collective over TP for a row-parallel base)."""
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
        self.enabled = True  # off inside `adapters_disabled` (the base model: preference training's reference)
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
        self.lora_magnitude_vector = None
        if use_dora:
            if magnitude is None:
                magnitude = self.weight_norm()
            out_local = self.lora_B.weight.shape[0]
            if magnitude.shape != (out_local,):
                raise LoraError(f"DoRA magnitude of shape {list(magnitude.shape)} for a layer of {out_local} rows")
            self.lora_magnitude_vector = nn.Parameter(magnitude.detach().to(lora_b.dtype).clone())
            column_split = self.mode == "column" and self.tp_size > 1
            set_tensor_model_parallel_attributes(self.lora_magnitude_vector, column_split, 0 if column_split else -1, 1)
            self.lora_magnitude_vector.allreduce = getattr(base.weight, "allreduce", True)
            # Row-parallel under SP: each rank scales its part of the sequence (see the module docstring).
            # Duplicated (e.g. MLA's down projections) under SP: each rank sees its tokens only, like the factors.
            self.lora_magnitude_vector.sequence_parallel = (self.mode == "row" and self.sequence_parallel) or (
                self.mode == "duplicated" and getattr(base.weight, "sequence_parallel", False)
            )
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._branches(x, with_base=False)[0]

    def _branches(self, x: torch.Tensor, with_base: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale * B A dropout(x), and with `with_base` W dropout(x) without bias: DoRA's base term in
        training with dropout), laid out like the base output."""
        from megatron.core.tensor_parallel import mappings

        x = self._normalized_input(x)
        weight = self.base_layer.weight
        if self.tp_size == 1:
            x = self.dropout(x)
            return self.lora_B(self.lora_A(x)) * self.scale, F.linear(x, weight) if with_base else None
        group, base = self.tp_group, None
        if self.mode == "column":
            if self.sequence_parallel:  # the base gathers the sequence itself; the adapter must too
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
            x = self.dropout(x)
            hidden = mappings.copy_to_tensor_model_parallel_region(self.lora_A(x), group=group)
            if with_base:  # x's gradient from this rank's rows is partial: all-reduced like the base layer's
                base = F.linear(mappings.copy_to_tensor_model_parallel_region(x, group=group), weight)
            return self.lora_B(hidden) * self.scale, base
        x = self.dropout(x)
        hidden = mappings.reduce_from_tensor_model_parallel_region(self.lora_A(x), group=group)
        out = self.lora_B(hidden) * self.scale
        if with_base:
            base = mappings.reduce_from_tensor_model_parallel_region(F.linear(x, weight), group=group)
        if self.sequence_parallel:
            out = mappings.scatter_to_sequence_parallel_region(out, group=group)
            base = mappings.scatter_to_sequence_parallel_region(base, group=group) if with_base else None
        return out, base

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """Row norms of W + scale * B A (fp32), this rank's rows; summed over TP for a row-parallel base."""
        squares = adapted_weight(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scale)
        squares = squares.square().sum(dim=1)
        if self.mode == "row" and self.tp_size > 1:
            from megatron_swift.distributed.runtime import comm_device

            # At build time the base weight may still be on the CPU; the TP group (NCCL on GPU) takes comm_device().
            device, squares = squares.device, squares.to(comm_device())
            torch.distributed.all_reduce(squares, group=self.tp_group)
            squares = squares.to(device)
        return squares.sqrt()

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
        if not self.enabled:
            return out, bias
        if self.lora_magnitude_vector is None:
            return out + self.lora_delta(x).to(out.dtype), bias
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        lora, base = self._branches(x, with_base=dropped)
        if base is None:  # W x is the base output, less a bias the layer added itself
            inner_bias = getattr(self.base_layer, "bias", None)
            base = out - inner_bias if bias is None and inner_bias is not None else out
        factor = (self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)).to(out.dtype)
        return out + (factor - 1) * base.to(out.dtype) + factor * lora.to(out.dtype), bias

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
        axis = {"column": {"lora_B.weight": 0, MAGNITUDE: 0}, "row": {"lora_A.weight": 1}}.get(self.mode, {})
        if self.lora_magnitude_vector is not None:
            adapter[MAGNITUDE] = self.lora_magnitude_vector
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


@contextlib.contextmanager
def adapters_disabled(chunks):
    """The model without its adapters (base layers only; modules_to_save stay as trained) inside the block:
    LoRA preference training's reference model, with no second copy of the weights (TRL's `disable_adapter`)."""
    layers = [module for chunk in chunks for module in chunk.modules() if isinstance(module, LoraLinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def _drop_base_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + BASE)]:
        state_dict[prefix + key[len(prefix + BASE) :]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith((BASE, "lora_A.", "lora_B.", MAGNITUDE)):
            state_dict[prefix + BASE + rest] = state_dict.pop(key)


def adapted_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A in fp32."""
    return weight.float() + (lora_b.float() @ lora_a.float()) * scale
