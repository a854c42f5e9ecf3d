"""The training loop: steps, progress bar and metrics on rank 0, periodic checkpoints.

Receives built, loaded, wrapped model chunks; knows nothing of where the weights came from.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_swift.data.simple import GlobalBatches
from megatron_swift.training.config import JobConfig
from megatron_swift.training.step import StepResult, comm_device, train_step


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption); agreed on by all ranks after each step."""

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB


def run_training(
    job: JobConfig,
    chunks,
    optimizer,
    scheduler,
    batches: GlobalBatches,
    vocab_size: int,
    *,
    start_iteration: int = 0,
    is_main: bool = True,
    save_fn: Callable[[int], None] | None = None,
) -> list[StepResult]:
    """Train from `start_iteration` to `train.train_iters`; returns every step's result.

    `save_fn(step)` is called every `checkpoint.save_interval` steps, at the end, and when a
    preemption signal arrives (the current step finishes, a checkpoint is saved, the loop returns).
    """
    from megatron.core import parallel_state as ps

    t = job.train
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    log_dir = Path(job.checkpoint.output_dir) / "logs"
    preemption = PreemptionFlag()
    results = []
    with contextlib.ExitStack() as stack:
        metrics = None
        if is_main:
            log_dir.mkdir(parents=True, exist_ok=True)
            metrics = stack.enter_context(open(log_dir / "metrics.jsonl", "a", encoding="utf-8"))
        bar = stack.enter_context(tqdm(total=t.train_iters, initial=start_iteration, disable=not is_main, desc="train"))
        for iteration in range(start_iteration, t.train_iters):
            start = time.perf_counter()
            microbatches = batches.next_microbatches(dp_rank, dp_size, t.micro_batch_size)
            result = train_step(chunks, optimizer, scheduler, microbatches, job.data.seq_length, vocab_size)
            elapsed = time.perf_counter() - start
            results.append(result)
            step = iteration + 1
            tokens_per_sec = t.global_batch_size * job.data.seq_length / elapsed
            if metrics is not None:
                record = {
                    "step": step,
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "tokens_per_sec": round(tokens_per_sec, 1),
                    "mem_gb": round(_memory_gb(), 3),
                    "skipped": result.skipped,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                lr=f"{result.lr:.2e}",
                gnorm=f"{result.grad_norm:.3f}",
                tok_s=f"{tokens_per_sec:.0f}",
            )
            bar.update(1)
            interval = job.checkpoint.save_interval
            preempted = preemption.agreed()
            due = step == t.train_iters or (interval and step % interval == 0)
            if save_fn is not None and (due or preempted):
                save_fn(step)
            if preempted:
                break
    return results
