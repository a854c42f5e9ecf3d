"""Streaming export: a megatron-core checkpoint -> HF safetensors, rule by rule, in bounded memory.

Planning (`plan_export`) reads no weight. The model is built on the meta device at TP1/PP1/EP1, so
megatron-core itself says under which sharded key and at which leading offsets (layer, expert) each
parameter is stored, whatever layout the checkpoint was saved from; the family rules say which HF
tensors (names, shapes) each parameter becomes. The plan is plain data: one item per megatron-core
parameter, and the output files laid out up front (checkpoint/shards.py).

Executing it (`export_worker`), a process takes whole output files; for each of their items it reads
only the regions that parameter needs (checkpoint/distcp.py), applies the rule and writes the HF
tensors at their planned offsets. Each HF tensor is computed once, by one process; peak memory is a
few copies of the largest tensor, not the model; N processes write disjoint files.

A LoRA run's checkpoint holds only what it trained: frozen weights come from the run's base (its HF
directory through the rules, or its megatron-core checkpoint), and each adapted weight gets
W + scale * B @ A exactly as `tuners.lora.merge_lora` computes it in the model (DoRA: rescaled per row
by its magnitude over the row norm, both read whole here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_swift.checkpoint.engine import TIED_ALIASES
from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.checkpoint.shards import PlannedTensor, ShardFileWriter, ShardLayout, plan_shards, write_index
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.models.mapping import ModelDims, Rule, stacked_name
from megatron_swift.models.naming import canonical_name, canonical_parameters, unwrap_model

MODEL, BASE, BASE_HF = "model", "base", "base_hf"  # where an item's value is read from


@dataclass(frozen=True)
class Region:
    """A parameter stored in a distributed checkpoint: `key`'s [offsets, offsets + sizes), of shape `shape`
    once the leading unit axes (layer, expert) are dropped; `global_shape` is what the model expects stored."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExportItem:
    """One megatron-core parameter and the HF tensors it becomes."""

    name: str  # canonical megatron-core name
    rule: Rule
    outputs: tuple[PlannedTensor, ...]
    dtype: torch.dtype  # the parameter's dtype in the model: values are cast to it first, as loading did
    source: str  # MODEL, BASE or BASE_HF
    region: Region | None  # where the value is stored (MODEL / BASE)
    # LoRA (A, B, their dtype, scale, DoRA magnitude or None) to merge
    adapter: tuple[Region, Region, torch.dtype, float, Region | None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass(frozen=True)
class ExportPlan:
    items: tuple[ExportItem, ...]
    layouts: tuple[ShardLayout, ...]
    files: tuple[int, ...]  # index into `layouts` of each item's file
    dims: ModelDims
    sources: dict[str, str]  # MODEL / BASE / BASE_HF -> directory

    @property
    def nbytes(self) -> int:
        return sum(layout.nbytes for layout in self.layouts)


def build_meta_chunks(args: GPTModelArgs, dtype: torch.dtype) -> list:
    """The model at TP1/PP1/EP1 on the meta device: every parameter's name, shape and dtype, no memory.
    Needs megatron-core's parallel state of a world of size 1 (`init_distributed(ParallelConfig())`)."""
    from megatron_swift.config import ParallelConfig
    from megatron_swift.models import build_model_chunks, transformer_config

    # CPU initialisation makes megatron-core allocate without an explicit device, so the meta device applies;
    # the local spec's sharded keys are the ones Transformer Engine layers save too.
    config = transformer_config(args, ParallelConfig(), params_dtype=dtype, perform_initialization=False,
                                use_cpu_initialization=True)  # fmt: skip
    with torch.device("meta"):
        return build_model_chunks(args, config, spec="local")


def _offset_in(view: torch.Tensor, base: torch.Tensor) -> tuple[int, ...] | None:
    """Where `view` starts inside the contiguous `base` (a block of it), or None when it is not such a block."""
    if view.dim() != base.dim() or view.stride() != base.stride() or not base.is_contiguous():
        return None
    delta, offsets = view.storage_offset() - base.storage_offset(), []
    for stride in base.stride():
        offsets.append(delta // stride if stride else 0)
        delta = delta % stride if stride else delta
    return tuple(offsets)


def parameter_regions(chunk) -> dict[int, Region]:
    """id(parameter) -> where megatron-core stores it, from the model's own sharded state dict.

    Checked, not assumed: every piece megatron-core would load into a parameter (a swiglu linear_fc1 has
    a gate and an up piece) must be the block of the parameter at the piece's offset in the global tensor,
    and the pieces must cover it; then the parameter is the global tensor's slice at its layer/expert
    offsets. A layout megatron-core introduces that breaks this fails here, before anything is read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pieces: dict[int, tuple[torch.Tensor, list]] = {}
    for value in nested_values(unwrap_model(chunk).sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            built = [v for v in nested_values(value.build()) if isinstance(v, ShardedTensor)]
            pieces.setdefault(id(value.data), (value.data, []))[1].extend(built)
        elif isinstance(value, ShardedTensor):
            pieces.setdefault(id(value.data), (value.data, []))[1].append(value)
    regions = {}
    for param_id, (param, found) in pieces.items():
        first = found[0]
        lead, shape = first.prepend_axis_num, tuple(param.shape)
        problem = None
        if any((p.key, p.prepend_axis_num, p.global_shape, p.global_offset[:lead])
               != (first.key, lead, first.global_shape, first.global_offset[:lead]) for p in found):  # fmt: skip
            problem = "pieces under different keys or layer/expert offsets"
        elif tuple(first.global_shape[lead:]) != shape:
            problem = f"stored at global shape {list(first.global_shape)} for a parameter of shape {list(shape)}"
        elif any(p.flattened_range is not None or _offset_in(p.data, param) != tuple(p.global_offset[lead:])
                 for p in found):  # fmt: skip
            problem = "a piece is not the block of the parameter at its global offset"
        elif sum(p.data.numel() for p in found) != param.numel():
            problem = "the pieces do not cover the parameter"
        if problem:
            raise CheckpointError(f"megatron-core saves {first.key} in a layout the exporter does not know: {problem}")
        offsets = tuple(first.global_offset[:lead]) + (0,) * len(shape)
        regions[param_id] = Region(first.key, offsets, (1,) * lead + shape, tuple(first.global_shape), shape)
    return regions


def _adapters(chunk) -> dict[str, tuple]:
    """Canonical base-weight name -> (lora_A, lora_B, scale, DoRA magnitude or None) of every LoRA-wrapped linear."""
    from megatron_swift.tuners.lora import LoraLinear

    model = unwrap_model(chunk)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            weight = canonical_name(f"{name}.weight", model.decoder.layers)
            found[weight] = (module.lora_A.weight, module.lora_B.weight, module.scale, module.lora_magnitude_vector)
    return found


def plan_export(
    chunk,
    args: GPTModelArgs,
    model_dir: Path,
    out_dtype: torch.dtype,
    max_shard_bytes: int,
    lora_base: dict | None = None,
) -> ExportPlan:
    """The export of the checkpoint in `model_dir` for `chunk` (built by `build_meta_chunks`, LoRA adapters
    applied for a LoRA run, whose `lora.base` metadata is `lora_base`); every source is validated here.

    Parameters the run trained (all of them, unless LoRA froze some) are read from `model_dir`; frozen
    ones from `lora_base`: `{"hf": dir}` through the rules, or `{"load": checkpoint dir}`."""
    from megatron_swift.checkpoint.mcore import full_model_weights_dir
    from megatron_swift.tuners.lora.layers import ADAPTER_KEYS

    regions, adapters = parameter_regions(chunk), _adapters(chunk)
    sources = {MODEL: str(Path(model_dir).absolute())}
    base_source = None
    if lora_base is not None:
        base_source = BASE_HF if "hf" in lora_base else BASE
        where = lora_base["hf"] if "hf" in lora_base else full_model_weights_dir(Path(lora_base["load"]))
        sources[base_source] = str(Path(where).absolute())
    items = []
    for name, param, _ in canonical_parameters(chunk):
        if name.endswith(ADAPTER_KEYS):
            continue  # merged into their base weight below
        if args.share_embeddings_and_output_weights:  # at PP1 megatron-core has no output weight then, but
            name = TIED_ALIASES.get(name, name)  # if it had, plan_shards would refuse the second embedding
        try:
            rule, bindings = args.mapping.resolve(name)
        except KeyError as exc:
            raise CheckpointError(f"family {args.family.name}: {exc.args[0]}") from None
        hf_names = rule.hf_names(bindings)
        shapes = [tuple(t.shape) for t in rule.to_hf(param, args.dims)]
        outputs = tuple(PlannedTensor(n, out_dtype, s) for n, s in zip(hf_names, shapes, strict=True))
        if id(param) not in regions:
            raise CheckpointError(f"megatron-core saves no tensor for {name}; cannot export it")
        source = base_source if base_source and not param.requires_grad else MODEL
        adapter = None
        if name in adapters:
            lora_a, lora_b, scale, magnitude = adapters[name]
            magnitude_region = regions[id(magnitude)] if magnitude is not None else None
            adapter = (regions[id(lora_a)], regions[id(lora_b)], lora_a.dtype, scale, magnitude_region)
        region = None if source == BASE_HF else regions[id(param)]
        items.append(ExportItem(name, rule, outputs, param.dtype, source, region, adapter))
    _check_sources(_requirements(items), sources)
    layouts = plan_shards(_file_groups(items), max_shard_bytes)
    file_of = {t.name: index for index, layout in enumerate(layouts) for t in layout.tensors}
    files = tuple(file_of[stacked_name(item.outputs[0].name)[0]] for item in items)
    return ExportPlan(tuple(items), tuple(layouts), files, args.dims, sources)


def _file_groups(items: list[ExportItem]) -> list[list[PlannedTensor]]:
    """The tensors each item writes, as groups never split across files; the slices of a stacked HF tensor
    (`NAME[i]`, one per expert item) become that tensor, and the items writing into it one group."""
    groups: list[list[PlannedTensor]] = []
    slices: dict[str, list[PlannedTensor]] = {}
    for item in items:
        whole = [t for t in item.outputs if stacked_name(t.name)[1] is None]
        for t in item.outputs:
            base, index = stacked_name(t.name)
            if index is not None:
                if base not in slices:
                    slices[base] = []
                    groups.append([PlannedTensor(base, t.dtype, ())])  # shape filled in below
                slices[base].append(t)
        if whole:
            groups.append(whole)
    for group in groups:
        planned = group[0]
        if planned.name in slices:
            parts = sorted(slices[planned.name], key=lambda t: stacked_name(t.name)[1])
            if [stacked_name(t.name)[1] for t in parts] != list(range(len(parts))) or len({t.shape for t in parts}) > 1:
                raise CheckpointError(
                    f"{planned.name}: the model's slices of it do not stack ({[t.name for t in parts]})"
                )
            group[0] = PlannedTensor(planned.name, planned.dtype, (len(parts), *parts[0].shape))
    return groups


def _requirements(items: list[ExportItem]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Source -> (stored name, shape the model expects) of everything the items read."""
    needed: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for item in items:
        if item.source == BASE_HF:  # the base's HF tensors are what the rule gives back, by name and shape
            needed.setdefault(BASE_HF, []).extend((t.name, t.shape) for t in item.outputs)
        else:
            needed.setdefault(item.source, []).append((item.region.key, item.region.global_shape))
        if item.adapter:
            regions = [*item.adapter[:2], *([item.adapter[4]] if item.adapter[4] else [])]
            needed.setdefault(MODEL, []).extend((r.key, r.global_shape) for r in regions)
    return needed


def _check_sources(needed: dict[str, list[tuple[str, tuple[int, ...]]]], sources: dict[str, str]) -> None:
    """Everything the plan reads is stored at the shape the model expects: all problems, one error per
    source, before any tensor is read."""
    from megatron_swift.checkpoint.distcp import DistcpReader
    from megatron_swift.checkpoint.hf import HFCheckpoint

    for source, wanted in needed.items():
        if source == BASE_HF:
            ckpt = HFCheckpoint(sources[source])
            stored = {name: ckpt.info(name).shape for name, _ in wanted if ckpt.info(name) is not None}
        else:
            reader = DistcpReader(sources[source])
            stored = {key: reader.shape(key) for key, _ in wanted if reader.shape(key) is not None}
        problems = []
        for key, shape in dict(wanted).items():
            if key not in stored:
                problems.append(f"{key}: missing")
            elif tuple(stored[key]) != tuple(shape):
                problems.append(f"{key}: stored with shape {list(stored[key])}, the model built from hf/config.json "
                                f"expects {list(shape)}")  # fmt: skip
        if problems:
            raise CheckpointError(f"{sources[source]}: does not fit this model; {len(problems)} problem(s):\n  "
                                  + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))  # fmt: skip


def assign_files(plan: ExportPlan, world: int) -> list[list[int]]:
    """Files per process: largest first to the least loaded (deterministic, so every process agrees)."""
    loads, owned = [0] * world, [[] for _ in range(world)]
    for index in sorted(range(len(plan.layouts)), key=lambda i: (-plan.layouts[i].nbytes, i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owned[rank].append(index)
        loads[rank] += plan.layouts[index].nbytes
    return [sorted(files) for files in owned]


class _Sources:
    """The directories a plan reads, opened on first use in each process."""

    def __init__(self, paths: dict[str, str]):
        self.paths, self._open = paths, {}

    def __getitem__(self, source: str):
        if source not in self._open:
            from megatron_swift.checkpoint.distcp import DistcpReader
            from megatron_swift.checkpoint.hf import HFCheckpoint

            path = self.paths[source]
            self._open[source] = HFCheckpoint(path) if source == BASE_HF else DistcpReader(path)
        return self._open[source]

    def read(self, source: str, region: Region) -> torch.Tensor:
        return self[source].read(region.key, region.offsets, region.sizes).reshape(region.shape)


@torch.no_grad()
def hf_tensors(item: ExportItem, sources: _Sources, dims: ModelDims) -> list[torch.Tensor]:
    """The HF tensors of one item, computed from only what its rule needs."""
    from megatron_swift.tuners.lora import merged_weight

    if item.source == BASE_HF:
        ckpt = sources[BASE_HF]
        value = item.rule.to_mcore([ckpt.get(t.name) for t in item.outputs], dims)
    else:
        value = sources.read(item.source, item.region)
    value = value.to(item.dtype)
    if item.adapter:
        region_a, region_b, dtype, scale, region_m = item.adapter
        lora_a, lora_b = (sources.read(MODEL, r).to(dtype) for r in (region_a, region_b))
        magnitude = sources.read(MODEL, region_m).to(dtype) if region_m else None
        value = merged_weight(value, lora_a, lora_b, scale, magnitude)
    return [t.to(planned.dtype) for t, planned in zip(item.rule.to_hf(value, dims), item.outputs, strict=True)]


def export_worker(plan: ExportPlan, out_dir: str) -> int:
    """Write this process's share of the planned files (RANK / WORLD_SIZE as torchrun sets them; one process
    without them); returns the bytes written."""
    from tqdm import tqdm

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = assign_files(plan, world)[rank]
    items: dict[int, list[ExportItem]] = {index: [] for index in mine}
    for item, file_index in zip(plan.items, plan.files, strict=True):
        if file_index in items:
            items[file_index].append(item)
    sources, written = _Sources(plan.sources), 0
    total = sum(plan.layouts[i].nbytes for i in mine)
    with tqdm(total=total, unit="B", unit_scale=True, desc="mcore-to-hf", disable=rank != 0) as bar:
        for file_index in mine:
            with ShardFileWriter(Path(out_dir), plan.layouts[file_index]) as writer:
                for item in items[file_index]:
                    for planned, tensor in zip(item.outputs, hf_tensors(item, sources, plan.dims), strict=True):
                        writer.write(planned.name, tensor)
                    written += item.nbytes
                    bar.update(item.nbytes)
    return written


def write_export(plan: ExportPlan, out_dir: Path, workers: int = 1) -> int:
    """Every planned file, written by `workers` local processes taking whole files each (at most one per
    file), then the index; returns the number of processes used."""
    from megatron_swift.distributed import run_workers

    workers = max(1, min(workers, len(plan.layouts)))
    written = sum(run_workers(export_worker, workers, plan, str(out_dir)))
    if written != plan.nbytes:  # every file closed complete, so this is a bug in the split
        raise AssertionError(f"wrote {written} bytes of {plan.nbytes} planned")
    write_index(out_dir, list(plan.layouts))
    return workers


def load_trainable(chunk, model_dir: Path) -> None:
    """Give a meta-built chunk real values for its trainable parameters only (a LoRA run's adapters and
    modules_to_save), read from the checkpoint; frozen parameters stay on the meta device."""
    from megatron_swift.checkpoint.distcp import DistcpReader

    model = unwrap_model(chunk)
    regions = parameter_regions(chunk)
    trainable = [(module, local, param) for module in model.modules()
                 for local, param in module.named_parameters(recurse=False) if param.requires_grad]  # fmt: skip
    wanted = [regions[id(param)] for _, _, param in trainable]
    _check_sources({MODEL: [(r.key, r.global_shape) for r in wanted]}, {MODEL: str(model_dir)})
    reader = DistcpReader(model_dir)
    for (module, local, param), region in zip(trainable, wanted, strict=True):
        value = reader.read(region.key, region.offsets, region.sizes).reshape(region.shape)
        setattr(module, local, torch.nn.Parameter(value.to(param.dtype), requires_grad=True))
