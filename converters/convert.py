"""Conversion workflows: HF directory -> megatron-core checkpoint, and back.

Each workflow validates its inputs completely (directories, config, weight headers, parallel
layout) before it starts any process group or reads any tensor, writes into a temporary
directory, and renames it into place only when everything succeeded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_swift.checkpoint.engine import load_hf_into_chunks
from megatron_swift.checkpoint.export import build_meta_chunks, load_trainable, plan_export, write_export
from megatron_swift.checkpoint.hf import (
    CheckpointError,
    HFCheckpoint,
    copy_side_files,
    ensure_generation_config,
    load_hf_config,
)
from megatron_swift.checkpoint.mcore import (
    HF_DIR,
    MODEL_DIR,
    atomic_output_dir,
    check_output_dir,
    describe_model,
    dtype_name,
    model_weights_dir,
    read_meta,
    save_model,
)
from megatron_swift.checkpoint.peft import apply_lora_with_adapter, peft_adapter_tensors, write_peft_adapter
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed, run_workers
from megatron_swift.models import build_model_chunks, dtype_from_name, transformer_config, translate
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.models.layout import model_layout_problems
from megatron_swift.tuners.lora import LoraConfig


def _require_layout(args: GPTModelArgs, parallel: ParallelConfig) -> None:
    problems = model_layout_problems(args, parallel)
    if problems:
        raise ConfigError("the model cannot be split this way:\n  " + "\n  ".join(problems))


def conversion_world_size(parallel: ParallelConfig) -> int:
    # Data-parallel width = EP so expert groups (EP x ETP) tile the TP x DP ranks exactly.
    return parallel.model_parallel_size * parallel.expert_model_parallel_size


def build_chunks(args: GPTModelArgs, parallel: ParallelConfig, dtype: torch.dtype, *, initialize: bool = False):
    config = transformer_config(args, parallel, params_dtype=dtype, perform_initialization=initialize)
    return build_model_chunks(args, config, spec="local" if not torch.cuda.is_available() else "auto")


def _hf_to_mcore_worker(hf_dir: str, tmp_dir: str, parallel: dict, dtype: str, vocab_divisor: int) -> None:
    parallel_cfg = ParallelConfig(**parallel)
    ctx = init_distributed(parallel_cfg)
    try:
        ckpt = HFCheckpoint(hf_dir)
        args = translate(ckpt.config, make_vocab_size_divisible_by=vocab_divisor)
        chunks = build_chunks(args, parallel_cfg, dtype_from_name(dtype))
        with tqdm(unit="B", unit_scale=True, desc="hf-to-mcore", disable=not ctx.is_main) as bar:

            def show(read: int, total: int) -> None:
                bar.total = total
                bar.update(read - bar.n)

            load_hf_into_chunks(chunks, ckpt, args, on_progress=show, adopt_tensors=True)
        save_model(chunks, Path(tmp_dir) / MODEL_DIR)
    finally:
        destroy_distributed()


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    parallel: ParallelConfig | None = None,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> Path:
    """Convert an HF directory into a megatron-core checkpoint written from `parallel`'s layout."""
    parallel = parallel or ParallelConfig()
    ckpt = HFCheckpoint(hf_dir)  # validates dir, config, every weight header
    args = translate(ckpt.config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _require_layout(args, parallel)
    dtype = dtype or dtype_name(ckpt.dtype)
    dtype_from_name(dtype)  # an unknown name fails here, before any process starts
    out = Path(out_dir)
    with atomic_output_dir(out) as tmp:
        run_workers(
            _hf_to_mcore_worker,
            conversion_world_size(parallel),
            str(ckpt.path.absolute()),
            str(tmp),
            dataclasses.asdict(parallel),
            dtype,
            make_vocab_size_divisible_by,
        )
        describe_model(tmp, args, ckpt.path, dtype, parallel, make_vocab_size_divisible_by)
    return out


def model_args_for_checkpoint(mcore_dir: str | Path) -> tuple[dict, GPTModelArgs]:
    """The metadata and model arguments stored with a megatron-swift checkpoint."""
    meta = read_meta(Path(mcore_dir))
    hf_config = load_hf_config(Path(mcore_dir) / HF_DIR)
    args = translate(hf_config, make_vocab_size_divisible_by=meta["make_vocab_size_divisible_by"])
    if args.padded_vocab_size != meta["padded_vocab_size"]:
        raise CheckpointError(
            f"{mcore_dir}: padded vocabulary {meta['padded_vocab_size']} in the metadata does not "
            f"match {args.padded_vocab_size} from hf/config.json"
        )
    return meta, args


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    lora: str | None = None,
    workers: int = 1,
) -> Path:
    """Export a megatron-core checkpoint (saved at any layout) as an HF safetensors directory.

    Streams: each HF tensor is computed from only the stored tensors its rule needs and written into its
    planned shard at once, so memory stays at a few of the largest tensors whatever the model's size;
    `workers` local processes write disjoint shards (at most one process per shard).

    A LoRA training run's checkpoint holds only adapters: `lora="merge"` writes the base model with
    the adapters merged in, `lora="adapter"` writes a PEFT adapter (HF module names) only.
    """
    mcore_dir, out = Path(mcore_dir), Path(out_dir)
    meta, args = model_args_for_checkpoint(mcore_dir)
    out_dtype = dtype_from_name(dtype or meta["dtype"])
    if ("lora" in meta) != (lora is not None):
        raise CheckpointError(
            f"{mcore_dir}: holds LoRA adapters only; choose --merge-lora (full model) or --adapter-only (PEFT)"
            if "lora" in meta
            else f"{mcore_dir}: not a LoRA training checkpoint; drop --merge-lora / --adapter-only"
        )
    if lora not in (None, "merge", "adapter"):
        raise ValueError(f"lora={lora!r}: choose merge or adapter")
    if workers < 1:
        raise ConfigError(f"workers={workers}: at least 1")
    check_output_dir(out)
    # The model is built on the meta device (no memory) only to learn where each parameter is stored.
    init_distributed(ParallelConfig())
    try:
        chunks = build_meta_chunks(args, dtype_from_name(meta["dtype"]))
        lora_config = _apply_lora(chunks, meta, args, mcore_dir) if lora else None
        if lora == "adapter":  # adapters and modules_to_save only: the frozen base is never read
            load_trainable(chunks[0], model_weights_dir(mcore_dir))
            peft_config, tensors = peft_adapter_tensors(
                chunks[0], args, lora_config, load_hf_config(mcore_dir / HF_DIR), out_dtype
            )
        else:
            base = meta["lora"]["base"] if lora else None
            plan = plan_export(chunks[0], args, model_weights_dir(mcore_dir), out_dtype, max_shard_bytes, base)
    finally:
        destroy_distributed()
    with atomic_output_dir(out) as tmp:
        if lora == "adapter":
            write_peft_adapter(tmp, peft_config, tensors, meta["lora"]["base"].get("hf") or meta["source"])
            return out
        copy_side_files(mcore_dir / HF_DIR, tmp)
        write_export(plan, tmp, workers)
        _set_config_dtype(tmp / "config.json", out_dtype)
        ensure_generation_config(tmp)
    return out


def _apply_lora(chunks, meta: dict, args: GPTModelArgs, mcore_dir: Path) -> LoraConfig:
    """Put a LoRA run's adapters on the meta-built chunks (their values are read later, from the checkpoint)."""
    lora_config = LoraConfig(**meta["lora"]["config"])
    with torch.device("meta"):
        apply_lora_with_adapter(chunks, lora_config, args, mcore_dir / HF_DIR, meta["lora"]["seed"])
    return lora_config


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    key = "dtype" if "dtype" in config else "torch_dtype"
    if config.get(key) != name:
        config[key] = name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
