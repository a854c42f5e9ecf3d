"""The generic conversion engine: applies a family's rules to checkpoints, in both directions.

- `load_hf_into_chunks`: fill this rank's megatron-core model chunks straight from HF safetensors
  (each rank reads only the tensors its parameters need and keeps only its TP/EP shard).
- `hf_tensors_from_chunk`: HF-named tensors out of an unsharded (TP1/PP1/EP1) model in memory. The
  exporter streams from the checkpoint instead (checkpoint/export.py); this is the in-model reference
  its tests compare against.

Nothing here knows a model family by name: families are data in megatron_swift/models/families.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_swift.checkpoint.hf import CheckpointError, HFCheckpoint
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.models.mapping import Rule, stacked_name
from megatron_swift.models.naming import canonical_parameters

# With tied embeddings megatron keeps a copy of the embedding as the output layer on the last
# pipeline stage; it is filled from the same HF tensor.
TIED_ALIASES = {"output_layer.weight": "embedding.word_embeddings.weight"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class _Slot:
    """One local parameter and how to fill it."""

    name: str
    param: torch.nn.Parameter
    rule: Rule
    hf_names: list[str]
    global_shape: tuple[int, ...]
    shard: tuple[int, int, int] | None  # (partition dim, rank, size) or None when replicated


def _shard_info(name: str, partition_dim: int | None) -> tuple[int, int, int] | None:
    from megatron.core import parallel_state as ps

    if partition_dim is None:
        return None
    if ".mlp.experts." in name:
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    else:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return (partition_dim, rank, size) if size > 1 else None


def _plan(chunks, args: GPTModelArgs, skip: frozenset[str] = frozenset()) -> list[_Slot]:
    mapping = args.mapping
    slots = []
    for chunk in chunks:
        for name, param, partition_dim in canonical_parameters(chunk):
            if name in skip:
                continue
            if args.share_embeddings_and_output_weights:
                name = TIED_ALIASES.get(name, name)
            try:
                rule, bindings = mapping.resolve(name)
            except KeyError as exc:
                raise CheckpointError(f"family {args.family.name}: {exc.args[0]}") from None
            shard = _shard_info(name, partition_dim)
            shape = list(param.shape)
            if shard:
                shape[shard[0]] *= shard[2]
            slots.append(_Slot(name, param, rule, rule.hf_names(bindings), tuple(shape), shard))
    return slots


def expected_hf_shapes(slots: list[_Slot], args: GPTModelArgs) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes implied by the model built from config.json (computed on meta tensors)."""
    shapes = {}
    for slot in slots:
        meta = torch.empty(slot.global_shape, device="meta")
        for hf_name, tensor in zip(slot.hf_names, slot.rule.to_hf(meta, args.dims), strict=True):
            shapes[hf_name] = tuple(tensor.shape)
    return shapes


def _all_needed_hf_names(local: set[str]) -> set[str]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(local))
    return set().union(*map(set, gathered))


def preflight(ckpt: HFCheckpoint, slots: list[_Slot], args: GPTModelArgs) -> None:
    """Every missing, mismatched or unmapped HF tensor, reported together, before any tensor is read."""
    ckpt.use_aliases(args.mapping.hf_aliases)
    problems = []
    for hf_name, shape in sorted(expected_hf_shapes(slots, args).items()):
        info = ckpt.info(hf_name)
        if info is None:
            problems.append(f"{hf_name}: missing from the checkpoint")
        elif info.shape != shape:
            problems.append(
                f"{hf_name}: checkpoint has shape {list(info.shape)}, the model built from config.json expects "
                f"{list(shape)}"
            )
    beyond = sorted({int(m.group(1)) for n in ckpt.tensors if (m := _HF_LAYER.match(n))} - set(range(args.num_layers)))
    if beyond:
        # e.g. DeepSeek-V3's multi-token-prediction module, stored as layer num_hidden_layers: a rule would map
        # its tensors by name, but no megatron-core layer here holds them. Never dropped silently.
        mtp = getattr(ckpt.config, "num_nextn_predict_layers", None)
        problems.append(
            f"tensors of layers {beyond} beyond num_hidden_layers={args.num_layers}"
            + (f" (multi-token-prediction layers, num_nextn_predict_layers={mtp})" if mtp else "")
            + ": not supported (megatron-swift converts and trains the main model only); remove them from the "
            "checkpoint (and their entries from model.safetensors.index.json) to convert without them"
        )
    needed = {stacked_name(n)[0] for n in _all_needed_hf_names({n for slot in slots for n in slot.hf_names})}
    mapping = args.mapping
    unmapped = sorted(n for n in ckpt.tensors if n not in needed and not mapping.is_known_hf(n))
    if args.share_embeddings_and_output_weights:
        unmapped = [n for n in unmapped if n != "lm_head.weight"]
    if unmapped:
        problems.append(f"tensors no rule of family {args.family.name} maps (would be lost): {', '.join(unmapped)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def check_against_chunks(ckpt: HFCheckpoint, chunks, args: GPTModelArgs, skip: frozenset[str] = frozenset()) -> None:
    """`preflight` for this rank's chunks: every problem of the checkpoint, before any tensor is read."""
    preflight(ckpt, _plan(chunks, args, skip), args)


@torch.no_grad()
def load_hf_into_chunks(
    chunks,
    ckpt: HFCheckpoint,
    args: GPTModelArgs,
    on_progress: Callable[[int, int], None] | None = None,
    adopt_tensors: bool = False,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Fill every parameter of this rank's chunks from the HF checkpoint, but those named in `skip` (canonical
    names of parameters the checkpoint does not have, which the caller initialises: a new reward head).

    `on_progress(read, total)`: HF bytes this rank has read so far, of the bytes its parameters need.

    `adopt_tensors`: where a rule's output already is the parameter's whole tensor (unsharded, same
    dtype and device), the parameter takes it instead of a copy; such tensors may map the safetensors
    file. For short-lived models that are only saved again (conversion), not for training.
    """
    slots = _plan(chunks, args, skip)
    preflight(ckpt, slots, args)
    total = ckpt.nbytes({n for slot in slots for n in slot.hf_names})
    read = 0
    for slot in slots:
        full = slot.rule.to_mcore([ckpt.get(n) for n in slot.hf_names], args.dims)
        if tuple(full.shape) != slot.global_shape:  # the preflight makes this a bug, not bad input
            raise AssertionError(f"{slot.name}: built {list(full.shape)}, expected {list(slot.global_shape)}")
        local = slot.rule.tp_shard(full, *slot.shard) if slot.shard else full
        adoptable = local.dtype == slot.param.dtype and local.device == slot.param.device and local.is_contiguous()
        if adopt_tensors and slot.shard is None and adoptable:
            slot.param.data = local
        else:
            slot.param.copy_(local)
        read += ckpt.nbytes(slot.hf_names)
        if on_progress:
            on_progress(min(read, total), total)  # a tied tensor read twice counts once


@torch.no_grad()
def hf_tensors_from_chunk(
    chunk, args: GPTModelArgs, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every parameter of an unsharded model chunk, one rule at a time; slices of a
    stacked HF tensor (`NAME[i]`) come last, stacked."""
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for slot in _plan([chunk], args):
        if slot.shard:
            raise ValueError("hf_tensors_from_chunk needs an unsharded model (TP1/EP1)")
        for hf_name, tensor in zip(slot.hf_names, slot.rule.to_hf(slot.param.detach(), args.dims), strict=True):
            base, index = stacked_name(hf_name)
            if index is None:
                yield hf_name, tensor.to("cpu", dtype or tensor.dtype)
            else:
                stacked.setdefault(base, {})[index] = tensor.to("cpu", dtype or tensor.dtype)
    for base, slices in stacked.items():
        yield base, torch.stack([slices[i] for i in range(len(slices))])
