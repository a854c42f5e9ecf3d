"""Megatron-Core checkpoint directories written by the converter.

Layout of `OUT/`:
  model/             megatron-core distributed checkpoint (torch_dist), reshardable on load
  hf/                the source config.json, tokenizer and generation files
  mswift_meta.json   family, source, dtype, padded vocabulary, versions, layout at save time

Directories are produced under a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint at OUT.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from converters.hf_io import CheckpointError, copy_side_files
from megatron_swift.fs import fsync_path, fsync_tree
from megatron_swift.training.checkpoint import (
    latest_checkpoint,
    model_sharded_state,
    restore_model_state,
    save_strategy,
)

META_NAME = "mswift_meta.json"
MODEL_DIR = "model"
HF_DIR = "hf"
FORMAT = "megatron-swift/mcore-checkpoint/v1"


def package_versions() -> dict[str, str]:
    found = {}
    for package in ("megatron-swift", "megatron-core", "torch", "transformers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def save_model(chunks, model_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    model_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state(chunks), str(model_dir), sharded_strategy=save_strategy())


def load_model(chunks, model_dir: Path) -> None:
    """Load a distributed checkpoint saved at any TP/PP/EP into this rank's chunks."""
    from megatron.core import dist_checkpointing

    restore_model_state(chunks, dist_checkpointing.load(model_sharded_state(chunks), str(model_dir)))


def model_weights_dir(ckpt_dir: Path) -> Path:
    """The distributed checkpoint holding the model: `model/` of a converted checkpoint, or the
    `model_optim/` of the latest iteration of a training run's save directory."""
    latest = latest_checkpoint(ckpt_dir)
    return latest / "model_optim" if latest is not None else Path(ckpt_dir) / MODEL_DIR


def full_model_weights_dir(ckpt_dir: Path) -> Path:
    """`model_weights_dir` of a checkpoint that holds a whole model (not a LoRA run's adapters)."""
    if "lora" in read_meta(ckpt_dir):
        raise CheckpointError(
            f"{ckpt_dir}: holds LoRA adapters only; export it with `mcore-to-hf --merge-lora` and start from that, "
            "or set lora.adapter to its `--adapter-only` export"
        )
    return model_weights_dir(ckpt_dir)


def read_meta(ckpt_dir: Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    meta_file = ckpt_dir / META_NAME
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such directory")
    if not meta_file.is_file() or not model_weights_dir(ckpt_dir).is_dir():
        raise CheckpointError(
            f"{ckpt_dir}: not a megatron-swift checkpoint (expected {META_NAME}, and {MODEL_DIR}/ or a training "
            "`latest` pointer)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def describe_model(ckpt_dir: Path, args, source: Path, dtype: str, parallel, make_vocab_size_divisible_by: int,
                   lora: dict | None = None) -> None:  # fmt: skip
    """Write what loading and exporting the model under `ckpt_dir` needs: the HF config, tokenizer and
    generation files of `source` into `hf/`, and the metadata file (with `lora` for adapter-only runs:
    options and the base weights' location)."""
    copy_side_files(source, Path(ckpt_dir) / HF_DIR)
    meta = {
        "format": FORMAT,
        "family": args.family.name,
        "architecture": args.family.architectures[0],
        "source": str(Path(source).absolute()),
        "dtype": dtype,
        "vocab_size": args.vocab_size,
        "padded_vocab_size": args.padded_vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "saved_with": {
            "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
            "expert_model_parallel_size": parallel.expert_model_parallel_size,
        },
        "versions": package_versions(),
    }
    if lora is not None:
        meta["lora"] = lora
    (ckpt_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; choose another --out or remove it")


@contextlib.contextmanager
def atomic_output_dir(out: Path):
    """Yield a temporary sibling of `out`; rename it to `out` on success, delete it on failure."""
    out = Path(out).absolute()
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)  # everything reaches the disk before the rename publishes it
        if out.exists():
            out.rmdir()  # an empty placeholder (checked above)
        tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
