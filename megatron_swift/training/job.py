"""The training job: check it, build its model, load or resume, train; one function per phase.

`train(job)` is what one rank of a torchrun launch runs (launch/pretrain_sft.py is the thin entry
point); tests and benchmarks call the phases directly. Weights come straight from an HF directory
(each rank reads only its shard, no offline step) or from a megatron-swift checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from megatron_swift.config import ConfigError
from megatron_swift.training.config import JobConfig, environment_problems, lora_export_meta, precision, preflight


def model_source(job: JobConfig) -> Path:
    """The directory holding the HF config and tokenizer of the model to train."""
    from megatron_swift.checkpoint.mcore import HF_DIR

    return Path(job.model.hf) if job.model.hf else Path(job.model.load) / HF_DIR


def check_job(job: JobConfig, world_size: int):
    """Translate the model config and preflight the whole job; raises ConfigError listing every problem."""
    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.models import translate

    args = translate(
        load_hf_config(model_source(job)), make_vocab_size_divisible_by=job.model.make_vocab_size_divisible_by
    )
    problems = preflight(job, world_size, args) + environment_problems(job)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the job:\n  " + "\n  ".join(problems))
    return args


def build_model(job: JobConfig, args, load_weights: bool = True) -> list:
    """This rank's model chunks, with their weights loaded unless a training checkpoint will provide them
    (with LoRA, checkpoints hold only the adapters: base weights always come from the model source)."""
    from megatron_swift.checkpoint.engine import load_hf_into_chunks
    from megatron_swift.checkpoint.hf import HFCheckpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.checkpoint.peft import apply_lora_with_adapter
    from megatron_swift.models import build_model_chunks, dtype_from_name, transformer_config
    from megatron_swift.training.config import transformer_overrides

    dtype = dtype_from_name(precision(job))
    # Initialisation stays on although every weight is then loaded: megatron-core marks tensor-parallel
    # weights (`tensor_model_parallel`, read by grad-norm clipping and the optimizers) only while initialising.
    config = transformer_config(args, job.parallel, params_dtype=dtype, **transformer_overrides(job, args.is_moe))
    model = job.model
    chunks = build_model_chunks(args, config, spec=model.spec, attention=model.attention, kernels=model.kernels,
                                fused_linear_cross_entropy=model.fused_linear_cross_entropy)  # fmt: skip
    lora = job.train.train_type == "lora"
    if (load_weights or lora) and job.model.hf:
        load_hf_into_chunks(chunks, HFCheckpoint(job.model.hf), args)
    elif load_weights or lora:
        load_model(chunks, full_model_weights_dir(Path(job.model.load)))
    if lora:
        report = apply_lora_with_adapter(chunks, job.lora, args, model_source(job), job.train.seed)
        if int(os.environ.get("RANK", 0)) == 0:
            print(report.summary())
    return chunks


def run_job(job: JobConfig, ctx, args) -> list:
    """Build, load (or resume) and train in an initialised world; returns the step results."""
    from transformers import AutoTokenizer

    from megatron_swift.checkpoint.mcore import latest_checkpoint
    from megatron_swift.data import build_train_data
    from megatron_swift.training.checkpoint import load_checkpoint, save_checkpoint
    from megatron_swift.training.flops import flops_per_token
    from megatron_swift.training.loop import run_training
    from megatron_swift.training.optim import wrap_for_training

    ckpt = job.checkpoint
    if ckpt.save and ctx.is_main:  # so that `mcore-to-hf` and `model.load` accept the save directory itself
        from megatron_swift.checkpoint.mcore import describe_model

        describe_model(Path(ckpt.save), args, model_source(job), precision(job), job.parallel,
                       job.model.make_vocab_size_divisible_by, lora=lora_export_meta(job))  # fmt: skip
    # Data first: a bad row fails before the model is built.
    data = build_train_data(job.data, AutoTokenizer.from_pretrained(model_source(job)), job.train.task,
                            job.train.global_batch_size, job.train.seed, progress=ctx.is_main)  # fmt: skip
    if ctx.is_main:
        print(data.summary())
    if job.train.epochs is not None:
        iters = math.ceil(job.train.epochs * data.num_samples / job.train.global_batch_size)
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, train_iters=iters))
    batches = data.batches
    resume_from = latest_checkpoint(ckpt.load or ckpt.save) if (ckpt.load or ckpt.save) else None
    chunks, optimizer, scheduler = wrap_for_training(build_model(job, args, load_weights=resume_from is None), job)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, chunks, optimizer, scheduler)
        start, batches.consumed_samples = state["iteration"], state["consumed_samples"]
        if ctx.is_main:
            print(f"resumed from {resume_from} at iteration {start}")

    def save(step: int) -> None:
        path = save_checkpoint(ckpt.save, step, chunks, optimizer, scheduler, batches.consumed_samples,
                               ckpt.save_total_limit, save_optimizer=not ckpt.no_save_optim)  # fmt: skip
        if ctx.is_main:
            print(f"saved checkpoint {path}")

    flops = flops_per_token(args.transformer, args.vocab_size, job.data.seq_length, job.train.train_type == "lora")
    return run_training(job, chunks, optimizer, scheduler, batches, args.vocab_size, start_iteration=start,
                        is_main=ctx.is_main, save_fn=save if ckpt.save else None, flops_per_token=flops,
                        eval_items=data.eval_items, eval_collate=data.eval_collate)  # fmt: skip


def train(job: JobConfig) -> list:
    """Run the whole job as one rank of a torchrun launch (or alone); returns the step results."""
    from megatron_swift.distributed import destroy_distributed, init_distributed

    args = check_job(job, int(os.environ.get("WORLD_SIZE", 1)))
    ctx = init_distributed(job.parallel, seed=job.train.seed)
    try:
        return run_job(job, ctx, args)
    finally:
        destroy_distributed()
