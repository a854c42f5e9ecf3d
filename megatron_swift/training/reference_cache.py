"""The on-disk cache of precomputed reference log-probs (`rlhf.precompute_ref_logps` with `data.cache_dir`).

`precompute_reference` (training/job.py) computes the reference's log-probs of every training and validation item
once before training; with `data.cache_dir` set they are stored there, next to the tokenized samples, as
`ref-logps-KEY.pt`, and a later start of the same job (a resume, or a new run on the same data and reference) loads
them instead of building the reference and running its forward. The key covers what the values depend on: the data
(the tokenized-sample cache's key of the training and validation files: their paths, sizes and times, the tokenizer
and template), every data option and the task, seed and global batch size (which shape the items: split, truncation,
packing, KTO's KL sequences), the precision and model options, and the reference weights (a sampled fingerprint of
their files: `rlhf.ref_model`, or the model's `model.hf` / `model.load` source). It leaves out the parallel layout:
log-probs computed at TP2 serve a TP1 run (they differ from a TP1 recomputation by float rounding only).

The file is written by one rank (the last pipeline stage's first tensor- and data-parallel rank, which holds the
gathered values) to a temporary name and renamed, so a crash or a concurrent job never leaves a partial entry; it is
read with `torch.load(weights_only=True)`. All ranks agree whether it is there before anyone relies on it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_swift.distributed.runtime import comm_device

SPLITS = ("train", "eval")


def reference_identity(job) -> str:
    """A fingerprint of the reference's weights (their files' sampled contents) and how they are used."""
    from megatron_swift.checkpoint.hf import weights_fingerprint
    from megatron_swift.checkpoint.mcore import model_fingerprint

    if job.rlhf.ref_model:
        return f"ref_model:{weights_fingerprint(job.rlhf.ref_model)}"
    if job.model.hf:
        return f"hf:{weights_fingerprint(job.model.hf)}:{job.train.train_type}"
    return f"load:{model_fingerprint(job.model.load)}:{job.train.train_type}"


def cache_path(job, tokenizer) -> Path | None:
    """Where this job's reference log-probs are cached; None without `data.cache_dir`."""
    from megatron_swift.data.cache import cache_key
    from megatron_swift.training.config import precision

    d = job.data
    if not d.cache_dir:
        return None
    data_options = {key: value for key, value in dataclasses.asdict(d).items()
                    if key not in ("dataset_num_proc", "cache_dir")}  # fmt: skip
    model_options = {key: value for key, value in dataclasses.asdict(job.model).items() if key not in ("hf", "load")}
    shaping = {"data": data_options, "model": model_options, "task": job.train.task, "seed": job.train.seed,
               "global_batch_size": job.train.global_batch_size, "precision": precision(job),
               "reference": reference_identity(job)}  # fmt: skip
    key = cache_key([*d.dataset, *d.val_dataset], tokenizer, d.template, shaping)
    return Path(d.cache_dir) / f"ref-logps-{key}.pt"


def present_on_every_rank(path: Path | None) -> bool:
    """Whether every rank sees the cache file (collective)."""
    if path is None:
        return False
    seen = torch.tensor([1.0 if path.is_file() else 0.0], device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    return bool(seen.item())


def load(path: Path) -> dict[str, list[torch.Tensor]]:
    """split -> the items' reference log-probs, in item order."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return {split: list(torch.split(stored[split], stored[f"{split}_lengths"].tolist())) for split in SPLITS
            if split in stored}  # fmt: skip


def save(path: Path, logps: dict[str, list[torch.Tensor]]) -> None:
    """Written atomically by the rank holding the gathered values; every rank returns once it is in place."""
    from megatron.core import parallel_state as ps

    writer = (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
    if writer:
        stored = {}
        for split, values in logps.items():
            stored[split] = torch.cat(values) if values else torch.zeros(0)
            stored[f"{split}_lengths"] = torch.tensor([len(v) for v in values], dtype=torch.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(stored, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
