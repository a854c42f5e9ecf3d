"""The training loop: steps, progress bar and metrics on rank 0, periodic checkpoints.

Receives built, loaded, wrapped model chunks; knows nothing of where the weights came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_swift.compat import keep_checkpoint_writer_in_process
from megatron_swift.data.batches import Batches
from megatron_swift.distributed.runtime import comm_device
from megatron_swift.training.config import JobConfig
from megatron_swift.training.evaluate import validation_loss, validation_microbatches
from megatron_swift.training.flops import peak_flops
from megatron_swift.training.measure import peak_memory_bytes, reset_peak_memory
from megatron_swift.training.metrics import MetricsLogger
from megatron_swift.training.optim import parameters_synced
from megatron_swift.training.preemption import PreemptionFlag
from megatron_swift.training.step import StepResult, train_step


def _mfu_fn(job: JobConfig, flops_per_token: float | None):
    """tokens/s -> MFU on a GPU listed in the peak table, else None."""
    if flops_per_token is None or not torch.cuda.is_available():
        return lambda tokens_per_sec: None
    peak = peak_flops(torch.cuda.get_device_name(), "fp8" if job.train.fp8_format else "bf16")
    if peak is None:
        return lambda tokens_per_sec: None
    devices = dist.get_world_size() if dist.is_initialized() else 1
    return lambda tokens_per_sec: round(flops_per_token * tokens_per_sec / (peak * devices), 4)


def _due(step: int, last: int, interval: int | None) -> bool:
    """Every `interval` steps, and at the last one."""
    return step == last or bool(interval and step % interval == 0)


def write_run_summary(job: JobConfig, chunks, tokens_per_step: int, steps: int, is_main: bool) -> None:
    """OUTPUT_DIR/logs/run_summary.json (rank 0): every rank's peak memory over the training steps and the
    model's trainable / total parameters (whole tensors, counted once over all ranks). Collective: every
    rank calls it."""
    from megatron_swift.tuners.lora.apply import parameter_counts

    peak = peak_memory_bytes()
    per_rank = [peak]
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, peak)
    trainable, total = parameter_counts(chunks)
    if not is_main:
        return
    summary = {
        "world_size": len(per_rank),
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "peak_memory_bytes_per_rank": per_rank,
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "peak_rss",
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    log_dir = Path(job.checkpoint.output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_training(
    job: JobConfig,
    chunks,
    optimizer,
    scheduler,
    batches: Batches,
    vocab_size: int,
    *,
    start_iteration: int = 0,
    is_main: bool = True,
    save_fn: Callable[[int], None] | None = None,
    flops_per_token: float | None = None,
    eval_items: Sequence | None = None,
    eval_collate: Callable | None = None,
    preference=None,
) -> list[StepResult]:
    """Train from `start_iteration` to `train.train_iters`; returns every step's result.

    `save_fn(step)` is called every `checkpoint.save_interval` steps, at the end, and when a
    preemption signal arrives (the current step finishes, a checkpoint is saved, the loop returns).
    With `eval_items` (the validation data, collated by `eval_collate`) the step record also holds
    `val_loss` / `val_ppl` every `train.eval_interval` steps and at the end. With `preference` (training/
    preference.py: train.task dpo / simpo / orpo; training/kto.py: kto) its step runs instead of the token-loss
    step, and its metrics are logged.
    """
    from megatron.core import parallel_state as ps

    t = job.train
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mfu = _mfu_fn(job, flops_per_token)
    results = []
    rows = 2 if preference is not None else 1  # a preference pair (KTO: a completion + its KL row) is two rows
    tokens_per_step = rows * t.global_batch_size * job.data.seq_length
    if save_fn is not None:
        keep_checkpoint_writer_in_process()
    reset_peak_memory()  # peak memory of the training steps (weights, optimizer state, activations)
    with contextlib.ExitStack() as stack:
        preemption = stack.enter_context(PreemptionFlag(comm_device()))
        metrics = None
        if is_main:
            log_dir = Path(job.checkpoint.output_dir) / "logs"
            metrics = MetricsLogger(log_dir, dataclasses.asdict(job), job.logging.tensorboard,
                                    job.logging.wandb_project, start_step=start_iteration)  # fmt: skip
            stack.callback(metrics.close)
        bar = stack.enter_context(tqdm(total=t.train_iters, initial=start_iteration, disable=not is_main, desc="train"))
        for iteration in range(start_iteration, t.train_iters):
            start = time.perf_counter()
            microbatches = batches.next_microbatches(dp_rank, dp_size, t.micro_batch_size)
            step_fn = preference.train_step if preference is not None else train_step
            result = step_fn(chunks, optimizer, scheduler, microbatches, vocab_size)
            elapsed = time.perf_counter() - start
            results.append(result)
            step = iteration + 1
            tokens_per_sec = tokens_per_step / elapsed
            validation = {}
            if eval_items is not None and _due(step, t.train_iters, t.eval_interval):
                groups = validation_microbatches(eval_items, eval_collate, t.global_batch_size, t.micro_batch_size,
                                                 dp_rank, dp_size, t.eval_iters)  # fmt: skip
                if preference is not None:
                    validation = preference.validate(chunks, groups)
                    if is_main:
                        names = ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_kl")
                        shown = ", ".join(f"{name[4:]} {validation[name]:.4f}" for name in names if name in validation)
                        bar.write(f"step {step}: validation {shown}")
                else:
                    held_out = validation_loss(chunks, groups, vocab_size)
                    validation = {"val_loss": held_out.loss, "val_ppl": round(held_out.perplexity, 4)}
                    if is_main:
                        bar.write(f"step {step}: validation loss {held_out.loss:.4f} (ppl {held_out.perplexity:.3f}, "
                                  f"{held_out.tokens} tokens)")  # fmt: skip
            if metrics is not None:
                metrics.log(
                    {
                        "step": step,
                        "loss": result.loss,
                        "lr": result.lr,
                        "grad_norm": result.grad_norm,
                        "tokens_per_sec": round(tokens_per_sec, 1),
                        "step_seconds": round(elapsed, 5),
                        "mfu": mfu(tokens_per_sec),
                        "skipped": result.skipped,
                        **result.router_losses,
                        **result.metrics,
                        **validation,
                    }
                )
            shown = {
                short: result.metrics[name]
                for short, name in (("acc", "rewards/accuracies"), ("margin", "rewards/margins"), ("kl", "kl"))
                if name in result.metrics
            }
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                lr=f"{result.lr:.2e}",
                gnorm=f"{result.grad_norm:.3f}",
                tok_s=f"{tokens_per_sec:.0f}",
                **{key: f"{value:.3f}" for key, value in shown.items()},
            )
            bar.update(1)
            preempted = preemption.agreed()
            if save_fn is not None and (_due(step, t.train_iters, job.checkpoint.save_interval) or preempted):
                with parameters_synced(chunks):
                    save_fn(step)
            if preempted:
                break
    write_run_summary(job, chunks, tokens_per_step, len(results), is_main)
    return results
