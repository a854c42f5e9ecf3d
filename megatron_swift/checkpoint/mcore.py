"""Megatron-Core checkpoint directories and the model part of every checkpoint.

Two kinds of directory hold a model, and both load into either:
- a converted checkpoint (`mswift-convert hf-to-mcore`): `model/` (megatron-core distributed checkpoint,
  torch_dist, reshardable on load), `hf/` (the source config.json, tokenizer and generation files),
  `mswift_meta.json` (family, source, dtype, padded vocabulary, versions, layout at save time);
- a training save directory (training/checkpoint.py): the same `hf/` and metadata, `iter_NNNNNNN/`
  directories and a `latest` pointer; its model is the latest iteration's `model_optim/`.

Converted directories are produced under a temporary sibling and renamed into place, so a crash never
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

from megatron_swift.checkpoint.hf import (
    FINGERPRINT_SAMPLE,
    CheckpointError,
    copy_side_files,
    sampled_fingerprint,
    weights_fingerprint,
)
from megatron_swift.fs import atomic_write_text, fsync_path, fsync_tree
from megatron_swift.models.naming import unwrap_model

META_NAME = "mswift_meta.json"
MODEL_DIR = "model"
HF_DIR = "hf"
FORMAT = "megatron-swift/mcore-checkpoint/v1"
LATEST = "latest"  # a training save directory's pointer to its newest complete iteration


def _trainable_keys(chunk) -> set[str] | None:
    """State-dict keys a checkpoint of this chunk holds: all (None) unless the model holds LoRA adapters, in which
    case only the trainable parameters; frozen weights come from the model source. Parts frozen in full training
    (a vision-language model's tower, training/vision_tuning.py) are saved: resume and export read every weight
    from the checkpoint."""
    from megatron_swift.tuners.lora import LoraLinear, trainable_state_keys

    model = unwrap_model(chunk)
    if not any(isinstance(module, LoraLinear) for module in model.modules()):
        return None
    return trainable_state_keys(model)


def model_sharded_state(chunks) -> dict:
    """Model part of a checkpoint: `model` (or `model0`, `model1`, ... with virtual pipeline stages).
    Converted checkpoints use the same keys, so either kind loads into either."""
    states = []
    for chunk in chunks:
        state, keep = unwrap_model(chunk).sharded_state_dict(), _trainable_keys(chunk)
        states.append(state if keep is None else {k: v for k, v in state.items() if k in keep})
    if len(states) == 1:
        return {"model": states[0]}
    return {f"model{i}": state for i, state in enumerate(states)}


def restore_model_state(chunks, loaded: dict) -> None:
    """Put what `dist_checkpointing.load` returned for `model_sharded_state(chunks)` into the chunks."""
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys, strict=True):
        keep = _trainable_keys(chunk)
        result = unwrap_model(chunk).load_state_dict(loaded[key], strict=keep is None)
        if keep is not None:
            missed = [k for k in result.missing_keys if k in keep]
            if missed or result.unexpected_keys:
                raise RuntimeError(f"checkpoint does not match the trainable parameters: missing {missed}, "
                                   f"unexpected {result.unexpected_keys}")  # fmt: skip


def save_strategy(writer_processes: int = 4):
    """torch_dist saving with `writer_processes` forked writers per rank.

    megatron-core's default is 2; on the 0.5B conversion benchmark 4 writers saved in ~1.4 s against
    ~2.0 s with 2 (serialisation and fsync proceed in parallel).
    """
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writer_processes)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    return Path(save_dir) / pointer.read_text().strip()


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

    from megatron_swift.compat import keep_checkpoint_writer_in_process

    # A conversion saves synchronously: without this, the first save of a process spawns megatron-core's
    # Manager server (a new interpreter that re-imports the main module) only to pass results in-process.
    keep_checkpoint_writer_in_process()
    model_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state(chunks), str(model_dir), sharded_strategy=save_strategy())


def load_model(chunks, model_dir: Path) -> None:
    """Load a distributed checkpoint saved at any TP/PP/EP into this rank's chunks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_swift.checkpoint.safety import check_distcp_metadata

    check_distcp_metadata(model_dir)
    try:
        loaded = dist_checkpointing.load(model_sharded_state(chunks), str(model_dir))
    except (CheckpointingException, KeyError) as exc:  # keys or shapes this model does not have
        raise CheckpointError(f"{model_dir}: does not fit this model ({mismatch(exc)})") from None
    restore_model_state(chunks, loaded)


def mismatch(exc: Exception) -> str:
    """The first line of megatron-core's complaint about a checkpoint that does not fit (they run long)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:500]}"


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


def model_fingerprint(ckpt_dir: str | Path) -> str:
    """`weights_fingerprint` of a megatron-swift checkpoint's model: its distributed checkpoint's metadata
    and the size and first 4 KiB of each data file."""
    model_dir = full_model_weights_dir(Path(ckpt_dir))

    def hash_file(path: Path, digest) -> None:
        with open(path, "rb") as handle:
            digest.update(str(path.stat().st_size).encode())
            digest.update(handle.read() if path.name == ".metadata" else handle.read(FINGERPRINT_SAMPLE))

    return sampled_fingerprint([model_dir / ".metadata", *model_dir.glob("*.distcp")], hash_file)


def base_fingerprint(base: dict) -> str:
    """The fingerprint of a LoRA run's frozen base weights, `{"hf": dir}` or `{"load": checkpoint dir}`."""
    return weights_fingerprint(base["hf"]) if "hf" in base else model_fingerprint(base["load"])


def check_lora_base(ckpt_dir: Path, recorded: dict, base: dict | None = None) -> None:
    """A LoRA checkpoint's adapters belong to the base weights it was trained on: refuse other weights.

    `recorded` is the checkpoint's `lora.base` metadata; `base` the base about to be used (default: the
    recorded location, whose weights may have changed since). Checkpoints from before fingerprints pass."""
    base = base or {k: v for k, v in recorded.items() if k in ("hf", "load")}
    expected = recorded.get("fingerprint")
    if expected is None:
        return
    where = base.get("hf") or base.get("load")
    try:
        found = base_fingerprint(base)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{ckpt_dir}: its LoRA adapters need their base weights, which cannot be read: {exc}"
        ) from None
    if found != expected:
        raise CheckpointError(
            f"{ckpt_dir}: its LoRA adapters were trained on other base weights than those in {where} (the weights "
            "fingerprint differs). Use the base the run trained on (model.hf / model.load as recorded in "
            f"{Path(ckpt_dir) / META_NAME}), or start a new run (another checkpoint.save) on these weights"
        )


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


_SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "num_moe_experts", "moe_ffn_hidden_size")  # fmt: skip


def model_shape(args) -> dict:
    """Family, vocabulary and layer sizes: checkpoints of different shapes cannot load into each other."""
    return {
        "family": args.family.name,
        "vocab_size": args.vocab_size,
        **{k: args.transformer.get(k) for k in _SHAPE_KEYS},
    }


def describe_model(ckpt_dir: Path, args, source: Path, dtype: str, parallel, make_vocab_size_divisible_by: int,
                   lora: dict | None = None) -> None:  # fmt: skip
    """Write what loading and exporting the model under `ckpt_dir` needs: the HF config, tokenizer and
    generation files of `source` into `hf/`, and the metadata file (with `lora` for adapter-only runs:
    options and the base weights' location and fingerprint)."""
    copy_side_files(source, Path(ckpt_dir) / HF_DIR)
    if args.reward_head:  # hf/config.json describes the reward model: mcore-to-hf writes one, model.load reads one
        from megatron_swift.models.reward import reward_model_config

        config_file = Path(ckpt_dir) / HF_DIR / "config.json"
        config = reward_model_config(json.loads(config_file.read_text()), args.family.reward_architecture,
                                     args.pad_token_id)  # fmt: skip
        atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {
        "format": FORMAT,
        "family": args.family.name,
        "architecture": args.family.reward_architecture if args.reward_head else args.family.architectures[0],
        "source": str(Path(source).absolute()),
        "dtype": dtype,
        "vocab_size": args.vocab_size,
        "padded_vocab_size": args.padded_vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "model": model_shape(args),
        "saved_with": {
            "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
            "expert_model_parallel_size": parallel.expert_model_parallel_size,
        },
        "versions": package_versions(),
    }
    if lora is not None:
        meta["lora"] = lora
    atomic_write_text(Path(ckpt_dir) / META_NAME, json.dumps(meta, indent=2) + "\n")


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
