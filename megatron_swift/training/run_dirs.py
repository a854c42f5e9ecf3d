"""The job's directories on disk: checked before any work starts, owned by one job at a time.

- `directory_problems(job, args)` runs on every rank before any process group exists; it only reads, and
  returns every problem, each naming the field and the path:
  `checkpoint.output_dir` / `checkpoint.save` are directories this process can create and write, on a
  file system with free space; a save directory that already holds checkpoints holds this job's (same
  family and shapes, LoRA or not, the same adapter shapes and LoRA base weights); the checkpoint a run
  would resume from is complete; `model.load` is a megatron-swift checkpoint (an HF directory there is
  named as such).
- `SaveDirLock`: the save directory's lock, held by rank 0 for the whole run, so two jobs never write
  one directory; taking it also removes what interrupted saves left behind (`.iter_*.tmp`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.checkpoint.mcore import (
    HF_DIR,
    LATEST,
    META_NAME,
    base_fingerprint,
    check_lora_base,
    model_shape,
    read_meta,
)
from megatron_swift.config import ConfigError

LOCK_NAME = ".mswift.lock"
MIN_FREE_BYTES = 64 * 1024**2  # below this a checkpoint or the metrics cannot be written at all
_LORA_SHAPE_KEYS = ("rank", "target_modules", "modules_to_save")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_dir_problems(path: str | Path, field: str) -> list[str]:
    """Why `path` cannot be (created and) written as a directory, or nothing."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        return [f"{field}={path}: is a file, not a directory; choose a directory path"]
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return [f"{field}={path}: {existing} is a file, so the directory cannot be created there"]
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(existing) else "permission denied"
        return [f"{field}={path}: cannot write in {existing} ({reason}); choose a writable directory"]
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return [f"{field}={path}: only {free // 1024**2} MiB free on its file system; free space or choose another"]
    return []


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def resume_point_problems(save_dir: Path, field: str) -> list[str]:
    """A `latest` pointer, if any, must name a complete checkpoint in the same directory."""
    pointer = save_dir / LATEST
    if not pointer.exists():
        return []
    name = pointer.read_text().strip() if pointer.is_file() else ""
    target = save_dir / name
    restore = f"point {pointer} at a complete iter_* directory (or remove it to start over)"
    if not name.startswith("iter_") or not target.is_dir():
        return [f"{field}={save_dir}: {LATEST} names {name!r}, which is not a checkpoint directory there; {restore}"]
    missing = [p for p in ("train_state.json", "model_optim/.metadata") if not (target / p).is_file()]
    if missing:
        return [f"{field}={save_dir}: {target.name} is incomplete (no {', '.join(missing)}); {restore}"]
    return []


def _ownership_problems(save_dir: Path, job, args) -> list[str]:
    """A save directory with metadata belongs to one model, one training type and one LoRA base."""
    meta_file = save_dir / META_NAME
    if not meta_file.is_file():
        if (save_dir / LATEST).exists():
            return [f"checkpoint.save={save_dir}: has a {LATEST} pointer but no {META_NAME}; not a megatron-swift "
                    "save directory: choose another checkpoint.save"]  # fmt: skip
        return []
    meta = json.loads(meta_file.read_text())
    way_out = (f"choose another checkpoint.save for this job (to start from that checkpoint's weights, set "
               f"model.load={save_dir})")  # fmt: skip
    saved, now = (
        meta.get("model") or {"family": meta.get("family"), "vocab_size": meta.get("vocab_size")},
        model_shape(args),
    )
    differ = [f"{key} {saved[key]} (this job: {now[key]})" for key in saved if saved[key] != now.get(key)]
    if differ:
        return [f"checkpoint.save={save_dir}: holds checkpoints of another model ({', '.join(differ)}); {way_out}"]
    lora = job.train.train_type == "lora"
    if ("lora" in meta) != lora:
        kind = "LoRA adapters" if "lora" in meta else "a fully trained model"
        return [f"checkpoint.save={save_dir}: holds {kind}, this job trains {'LoRA' if lora else 'in full'}; {way_out}"]
    if not lora:
        return []
    saved_lora = meta["lora"]["config"]
    differ = [f"lora.{key} {saved_lora.get(key)} (this job: {getattr(job.lora, key)})" for key in _LORA_SHAPE_KEYS
              if saved_lora.get(key) != getattr(job.lora, key)]  # fmt: skip
    if differ:
        return [f"checkpoint.save={save_dir}: its adapters have another shape ({', '.join(differ)}); {way_out}"]
    try:
        check_lora_base(save_dir, meta["lora"]["base"], lora_base(job))
    except CheckpointError as exc:
        return [f"checkpoint.save: {exc}"]
    return []


def lora_base(job) -> dict:
    """Where a LoRA job's frozen base weights come from."""
    m = job.model
    return {"hf": str(Path(m.hf).absolute())} if m.hf else {"load": str(Path(m.load).absolute())}


def lora_run_meta(job) -> dict | None:
    """What exporting or resuming a LoRA run needs (stored with its checkpoints): the adapter options, the seed
    their initialisation used, and the frozen base weights' location and fingerprint."""
    import dataclasses

    if job.train.train_type != "lora":
        return None
    base = lora_base(job)
    base["fingerprint"] = base_fingerprint(base)
    return {"config": dataclasses.asdict(job.lora), "base": base, "seed": job.train.seed}


def model_load_problems(load: str) -> list[str]:
    """`model.load` must be a megatron-swift checkpoint; say so when it is an HF directory."""
    path = Path(load)
    if (path / "config.json").is_file() and not (path / META_NAME).is_file():
        return [
            f"model.load={path}: is an HF model directory, not a megatron-swift checkpoint; set model.hf={path} "
            "instead (weights are read straight into the shards), or convert it with mswift-convert hf-to-mcore"
        ]
    try:
        read_meta(path)
    except CheckpointError as exc:
        return [f"model.load: {exc}"]
    if not (path / HF_DIR / "config.json").is_file():
        return [f"model.load={path}: {HF_DIR}/config.json is missing; the checkpoint is incomplete"]
    return []


def directory_problems(job, args) -> list[str]:
    """Every problem with the job's directories (see the module docstring); reads only."""
    ckpt = job.checkpoint
    found = writable_dir_problems(ckpt.output_dir, "checkpoint.output_dir")
    if ckpt.save:
        save_dir = Path(ckpt.save)
        found += writable_dir_problems(save_dir, "checkpoint.save")
        if save_dir.is_dir():
            found += _ownership_problems(save_dir, job, args) + resume_point_problems(save_dir, "checkpoint.save")
    if ckpt.load and ckpt.load != ckpt.save:
        found += resume_point_problems(Path(ckpt.load), "checkpoint.load")
    return found


class SaveDirLock:
    """An exclusive lock on a save directory, held by one process (rank 0) for a whole run.

    `flock` locks are released by the kernel when the holder dies, even by SIGKILL, so a preempted job's
    lock never outlives it; on file systems without flock support the run goes on with a warning.
    """

    def __init__(self, save_dir: str | Path):
        self.save_dir = Path(save_dir)
        self._handle = None

    def acquire(self) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / LOCK_NAME
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"checkpoint.save={self.save_dir}: another job is writing this directory ({holder}); wait for it "
                "to end, or give this job another checkpoint.save"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {path}: this file system has no flock ({exc.strerror}); nothing stops two jobs from "
                  "writing the same checkpoint.save")  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()} pid {os.getpid()} job {os.environ.get('SLURM_JOB_ID', '-')}\n")
        handle.flush()
        self._handle = handle
        for leftover in self.save_dir.glob(".iter_*.tmp"):  # an interrupted save (kill, crash, preemption)
            shutil.rmtree(leftover, ignore_errors=True)
        (self.save_dir / f".{LATEST}.tmp").unlink(missing_ok=True)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None
