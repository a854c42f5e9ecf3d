"""Worker for training parity tests: many parallel layouts trained inside ONE multi-process launch."""

from __future__ import annotations

import dataclasses

from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.training.config import JobConfig, TrainSection
from megatron_swift.tuners.lora import LoraConfig
from tests.dist_matrix import run_case_matrix


def job_for(
    hf_dir: str,
    data_path: str,
    output_dir: str,
    parallel: dict,
    train: dict,
    lora: dict | None = None,
    checkpoint: dict | None = None,
    moe: dict | None = None,
    data: dict | None = None,
    rlhf: dict | None = None,
    **model,
) -> JobConfig:
    """A tiny test job; `lora` options switch it to LoRA training; `checkpoint`, `moe`, `data` and `rlhf` set fields
    of those sections."""
    job = JobConfig()
    if lora is not None:
        job.lora = LoraConfig(**lora)
        train = {**train, "train_type": "lora"}
    job.model = dataclasses.replace(job.model, hf=hf_dir, **model)
    job.data = dataclasses.replace(job.data, **{"dataset": [data_path], "seq_length": 32, **(data or {})})
    job.parallel = ParallelConfig(**parallel)
    job.train = dataclasses.replace(
        TrainSection(global_batch_size=4, micro_batch_size=1, train_iters=3, lr=1e-3, lr_decay_style="constant"),
        **train,
    )
    job.checkpoint = dataclasses.replace(job.checkpoint, **{"output_dir": output_dir, **(checkpoint or {})})
    job.moe = dataclasses.replace(job.moe, **(moe or {}))
    job.rlhf = dataclasses.replace(job.rlhf, **(rlhf or {}))
    return job


def losses_for_cases(cases: list[tuple[str, dict, dict]], data_path: str, output_dir: str) -> dict[int, list[float]]:
    """case index -> per-step losses (reported by global rank 0) for (hf_dir, parallel, train[, lora[, model[,
    checkpoint[, moe[, data[, rlhf]]]]]]) cases; `model` holds ModelSection options (e.g. kernels), the others the
    options of those sections."""
    import os

    from megatron_swift.training.job import check_job, run_job

    found = {}
    try:
        for index, (hf_dir, parallel, train, *rest) in enumerate(cases):
            lora, model, checkpoint, moe, data, rlhf = (*rest, *(None, {}, None, None, None, None)[len(rest) :])
            job = job_for(hf_dir, data_path, f"{output_dir}/case{index}", parallel, train, lora, checkpoint, moe, data,
                          rlhf, **model)  # fmt: skip
            args = check_job(job, int(os.environ.get("WORLD_SIZE", 1)))
            ctx = init_distributed(job.parallel, seed=job.train.seed)
            results = run_job(job, ctx, args)
            if ctx.is_main:
                found[index] = [r.loss for r in results]
    finally:
        destroy_distributed()
    return found


def run_cases(cases, data_path, output_dir, world_size: int) -> list[list[float]]:
    cases_arg = [(str(h), *rest) for h, *rest in cases]
    return run_case_matrix(losses_for_cases, len(cases), world_size, cases_arg, str(data_path), str(output_dir))
