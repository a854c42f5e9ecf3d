"""Put LoRA adapters on a model's chunks: resolve targets, initialise, freeze the rest, count.

Targets are resolved against canonical module names (global layer / expert indices, see
models/naming.py), so every parallel layout picks the same modules and initialises each adapter
from the same seeded full-size tensors before cutting this rank's shard: a TP2 or EP2 run starts
from exactly the single-process adapter.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from megatron_swift.models.family import Family
from megatron_swift.models.naming import canonical_name, unwrap_model
from megatron_swift.tuners.lora.config import LoraConfig
from megatron_swift.tuners.lora.layers import BASE, LoraError, LoraLinear, parallel_mode

# modules_to_save short names -> module path suffix.
# Each may be absent from a pipeline stage (a reward model's `score` head lives on the last one).
SAVE_ALIASES = {"embedding": "embedding", "output_layer": "output_layer", "router": "mlp.router", "score": "score"}


@dataclass
class LoraReport:
    adapted: list[str]  # canonical module names that got an adapter (this rank)
    trainable_params: int  # whole model, all ranks
    total_params: int

    def summary(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"LoRA: {len(self.adapted)} linears adapted on this rank; trainable parameters "
            f"{self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)"
        )


def hf_to_mcore_linear(family: Family) -> dict[str, str]:
    """HF projection name (q_proj, ...) -> the megatron-core linear holding it, from the family table."""
    found = {}
    for rule in family.mapping.rules:
        short = next((s for s in family.lora_linears if rule.mcore.endswith(f".{s}.weight")), None)
        if short is not None:
            for hf_name in rule.hf:
                found[hf_name.rsplit(".", 2)[-2]] = short
    return found


def _linear_matcher(config: LoraConfig, family: Family):
    """A function canonical module name -> bool, after checking that every pattern can match."""
    hf_names = hf_to_mcore_linear(family)
    shorts, regexes, hf_requested = set(), [], set()
    for pattern in config.target_modules:
        if pattern == "all-linear":
            shorts.update(family.lora_linears)
        elif pattern in family.lora_linears:
            shorts.add(pattern)
        elif pattern in hf_names:
            hf_requested.add(pattern)
        elif pattern.startswith("re:"):
            regexes.append((pattern, re.compile(pattern[3:])))
        else:
            raise LoraError(
                f"lora.target_modules: {pattern!r} is not a linear of the {family.name} family; use all-linear, "
                f"{', '.join(family.lora_linears)}, {', '.join(sorted(hf_names))} or re:<regex over module paths>"
            )
    for short in sorted({hf_names[name] for name in hf_requested}):
        fused = sorted(name for name, target in hf_names.items() if target == short)
        missing = [name for name in fused if name not in hf_requested]
        if missing:
            raise LoraError(
                f"lora.target_modules: {', '.join(fused)} are fused into megatron-core's {short}; target all of "
                f"them (missing {', '.join(missing)}) or {short}"
            )
        shorts.add(short)
    return shorts, regexes


def _init_full(shape, seed: int, zero: bool, dtype) -> torch.Tensor:
    full = torch.zeros(shape, dtype=torch.float32)
    if not zero:  # PEFT's default for lora_A (kaiming uniform, a = sqrt(5))
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return full.to(dtype)


def _adapter_shards(base: nn.Module, name: str, config: LoraConfig, family: Family, seed: int, initial=None):
    """This rank's (A, B, DoRA magnitude or None) for the base linear with canonical name `name`: cut from
    `initial(name, rule, bindings)`'s full-size tensors when given (an imported adapter), else from seeded
    random ones. A magnitude is only ever imported: a new one starts as PEFT's (see LoraLinear)."""
    mode = parallel_mode(base)
    group = getattr(base, "tp_group", None)
    size = group.size() if group is not None and mode != "duplicated" else 1
    rank = group.rank() if size > 1 else 0
    out_local, in_local = base.weight.shape
    out_full = out_local * size if mode == "column" else out_local
    in_full = in_local * size if mode == "row" else in_local
    rule, bindings = family.mapping.resolve(f"{name}.weight")  # the base weight's layout decides how B/A are cut
    dtype = base.weight.dtype
    magnitude = None
    if initial is not None:
        lora_a, lora_b, *rest = initial(name, rule, bindings)
        magnitude = rest[0] if rest else None
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        if lora_a.shape[1] != in_full or lora_b.shape[0] != out_full or lora_a.shape[0] != lora_b.shape[1]:
            raise LoraError(f"{name}: adapter shapes A {list(lora_a.shape)}, B {list(lora_b.shape)} do not fit "
                            f"the layer ([r, {in_full}], [{out_full}, r])")  # fmt: skip
        if (magnitude is not None) != config.use_dora:
            raise LoraError(f"{name}: lora.use_dora is {config.use_dora} but the adapter "
                            f"{'has' if magnitude is not None else 'has no'} DoRA magnitude; set it as the adapter was "
                            "trained")  # fmt: skip
        if magnitude is not None:
            magnitude = magnitude.to(dtype)
            if magnitude.shape != (out_full,):
                raise LoraError(f"{name}: DoRA magnitude of shape {list(magnitude.shape)} for {out_full} rows")
    else:
        name_seed = seed + zlib.crc32(name.encode())
        lora_a = _init_full((config.rank, in_full), name_seed, zero=False, dtype=dtype)
        lora_b = _init_full((out_full, config.rank), name_seed + 1, zero=config.init_b_zero, dtype=dtype)
    if size > 1:
        if mode == "column":
            lora_b = rule.tp_shard(lora_b, 0, rank, size)
            magnitude = rule.tp_shard(magnitude, 0, rank, size) if magnitude is not None else None
        else:
            lora_a = rule.tp_shard(lora_a, 1, rank, size)
    return lora_a.contiguous(), lora_b.contiguous(), magnitude


def apply_lora(chunks: list, config: LoraConfig, family: Family, seed: int, initial=None) -> LoraReport:
    """Wrap the targeted linears of every chunk in place, freeze everything else but modules_to_save.

    `initial(name, rule, bindings) -> (A, B[, DoRA magnitude])`: full-size starting adapters (megatron layout)
    of each targeted linear, e.g. from a PEFT adapter (megatron_swift/checkpoint/peft.py); default: seeded random
    A, zero B (and with lora.use_dora PEFT's magnitude, the row norms of the adapted weight).
    """
    shorts, regexes = _linear_matcher(config, family)
    adapted, matched_regexes = [], set()
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
        for param in model.parameters():
            param.requires_grad = False
        targets = []
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                raise LoraError(f"{module_name} already has a LoRA adapter (apply_lora ran twice)")
            if getattr(module, "weight", None) is None or not module_name.rsplit(".", 1)[-1].startswith("linear_"):
                continue
            name = canonical_name(f"{module_name}.weight", layers).removesuffix(".weight")
            hits = [p for p, regex in regexes if regex.search(name)]
            matched_regexes.update(hits)
            if module_name.rsplit(".", 1)[-1] in shorts or hits:
                targets.append((module_name, name, module))
        for module_name, name, module in targets:
            if config.use_dora and ".local_experts." in name:
                raise LoraError(f"lora.use_dora: DoRA on routed-expert linears ({name}) is not supported (PEFT has "
                                "no DoRA for experts); leave the experts out of lora.target_modules")  # fmt: skip
            lora_a, lora_b, magnitude = _adapter_shards(module, name, config, family, seed, initial)
            wrapper = LoraLinear(module, lora_a, lora_b, config.scale, config.dropout, config.use_dora, magnitude)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapper)
            adapted.append(name)
        _unfreeze_modules_to_save(model, config.modules_to_save)
    unmatched = [p for p in config.target_modules if p.startswith("re:") and p not in matched_regexes]
    if unmatched:
        raise LoraError(f"lora.target_modules: {', '.join(unmatched)} matched no linear module")
    trainable, total = parameter_counts(chunks)
    return LoraReport(adapted, trainable, total)


def embedding_output_requires_grad(chunks: list) -> None:
    """Full recomputation under LoRA: megatron-core checkpoints each recomputed group with a reentrant
    torch.autograd.Function, whose output gets a gradient only when one of its input tensors needs one. The frozen
    embedding's output does not, so without this the adapters inside recomputed layers would get no gradient (a
    3-step run measured: step-3 loss 6.10 instead of 5.88). Like HF's `enable_input_require_grads`, the embedding's
    output is marked as needing one; later pipeline stages receive inputs that already do."""
    for chunk in chunks:
        embedding = getattr(unwrap_model(chunk), "embedding", None)
        if embedding is not None:
            embedding.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))


def _unfreeze_modules_to_save(model: nn.Module, names: list[str]) -> None:
    for wanted in names:
        suffix = SAVE_ALIASES.get(wanted, wanted)
        found = [m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
        if not found and wanted not in SAVE_ALIASES:
            raise LoraError(f"lora.modules_to_save: {wanted!r} names no module of the model")
        for module in found:
            for param in module.parameters():
                param.requires_grad = True


def trainable_state_keys(chunk) -> set[str]:
    """State-dict keys of the trainable parameters (what a LoRA checkpoint holds)."""
    model = unwrap_model(chunk)
    return {name.replace("." + BASE, ".") for name, param in model.named_parameters() if param.requires_grad}


def parameter_counts(chunks) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: full tensor sizes, counted once over all ranks."""
    import torch.distributed as dist

    sizes: dict[str, tuple[int, bool]] = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
        for name, param in model.named_parameters():
            tp = _param_tp_size(param)
            sizes[canonical_name(name.replace("." + BASE, "."), layers)] = (param.numel() * tp, param.requires_grad)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sizes)
        sizes = {k: v for part in gathered for k, v in part.items()}
    trainable = sum(n for n, grad in sizes.values() if grad)
    return trainable, sum(n for n, _ in sizes.values())


def _param_tp_size(param) -> int:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return 1
    if not getattr(param, "allreduce", True):  # expert weights are split by expert tensor parallelism
        return ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_world_size()
