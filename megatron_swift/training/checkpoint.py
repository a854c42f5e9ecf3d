"""Training checkpoints: model + optimizer (megatron-core distributed checkpoint), schedule, RNG, data position.

Layout of the `save` directory:
  iter_0000003/model_optim/   megatron-core distributed checkpoint (reshardable) of model and optimizer
  iter_0000003/train_state.json  iteration, consumed samples, LR-scheduler state
  iter_0000003/rng/rank_R.pt     every rank's RNG states (torch, CUDA, model-parallel tracker)
  latest                         "iter_0000003", replaced atomically after the directory is complete

A checkpoint is written into `.iter_0000003.tmp/` and renamed when every rank has finished, and only
then does `latest` move, so a crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.checkpoint.mcore import (
    LATEST,
    latest_checkpoint,
    mismatch,
    model_sharded_state,
    restore_model_state,
    save_strategy,
)
from megatron_swift.checkpoint.safety import check_distcp_metadata, load_tensor_file
from megatron_swift.fs import fsync_tree
from megatron_swift.training.optim import inner_optimizers, torch_adams, use_fused_torch_adam


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# How the distributed optimizer's state is laid out in a checkpoint (stored with it as content metadata).
# megatron-core's own default (`fully_sharded_model_space`, flattened ranges) cannot be written by the
# torch_dist backend; like Megatron-LM's default we write `dp_reshardable`: each rank writes its shard, and
# the run can resume at another data-parallel size (not at another TP/PP). Other optimizers ignore it.
OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _parallel_layout(optimizer) -> dict:
    """What a distributed-optimizer checkpoint must be resumed with (besides the data-parallel size)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "use_distributed_optimizer": any(isinstance(o, DistributedOptimizer) for o in inner_optimizers(optimizer)),
    }


def _check_resume_layout(ckpt_dir: Path, saved: dict | None, optimizer) -> None:
    """A distributed-optimizer checkpoint resumes only with its tensor / pipeline / expert layout."""
    from megatron_swift.config import ConfigError

    if not saved or not saved["use_distributed_optimizer"]:
        return
    now = _parallel_layout(optimizer)
    changed = [f"{'train' if key == 'use_distributed_optimizer' else 'parallel'}.{key}: saved {value}, now {now[key]}"
               for key, value in saved.items() if now[key] != value]  # fmt: skip
    if changed:
        raise ConfigError(
            f"{ckpt_dir}: its distributed-optimizer state is stored per data-parallel shard and resumes only "
            f"with the same layout (the data-parallel size may change); {'; '.join(changed)}. Resume with the "
            f"saved layout, or start a new run from its weights with model.load={ckpt_dir.parent} "
            "(the optimizer restarts)"
        )


def _sharded_state(chunks, optimizer, is_loading: bool, layout: dict) -> dict:
    model = model_sharded_state(chunks)
    merged_model = {k: v for part in model.values() for k, v in part.items()}
    return {**model, "optimizer": optimizer.sharded_state_dict(merged_model, is_loading=is_loading, metadata=layout)}


def _create_empty_adam_state(optimizer) -> None:
    """Give a fresh torch Adam inside megatron's optimizer the state a first step creates, moving nothing.

    Why: building the sharded state to load into, megatron-core's DistributedOptimizer reads the inner
    optimizer's per-parameter `step`; with Apex's or TE's fused Adam that is in the param groups, but with
    torch's Adam (no Apex/TE: CPU) it exists only after a first step, and the read fails. One step with
    zero gradients and a zero learning rate (and weight decay) creates exactly torch's state without
    changing a parameter; loading then overwrites it.
    """
    for adam in torch_adams(optimizer):
        if adam.state:
            continue
        saved = [(group["lr"], group["weight_decay"]) for group in adam.param_groups]
        for group in adam.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        adam.step()
        for group, (lr, weight_decay) in zip(adam.param_groups, saved, strict=True):
            group["lr"], group["weight_decay"] = lr, weight_decay
            for param in group["params"]:
                param.grad = None


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter of a torch Adam its own `step` tensor, with the step the checkpoint recorded.

    Why: without Apex/TE, megatron-core's DistributedOptimizer keeps the step in its param groups and on
    load puts ONE step tensor into every parameter's state, which its bucket-wise parameter state then
    overwrites with the value the state had before loading. torch's Adam increments each parameter's
    step in place, so a resumed run used wrong bias corrections (its second step's loss was 0.8% off the
    straight run's). The param group's `step` is the checkpoint's.
    """
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = adam.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    # torch keeps the step on the parameter's device for its fused kernel, on the CPU otherwise.
                    device = param.device if group.get("fused") or group.get("capturable") else "cpu"
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype, device=device)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    chunks,
    optimizer,
    scheduler,
    consumed_samples: int,
    save_total_limit: int | None = None,
    save_optimizer: bool = True,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Without `save_optimizer` (checkpoint.no_save_optim) only the model is written: a smaller checkpoint
    to export or start a new run from (`model.load`), which a run cannot resume."""
    from megatron.core import dist_checkpointing

    from megatron_swift.distributed import on_rank_zero_agreed

    save_dir = Path(save_dir)
    rank = dist.get_rank()
    final = save_dir / _iter_name(iteration)
    tmp = save_dir / f".{final.name}.tmp"

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier save that was interrupted
        (tmp / "rng").mkdir(parents=True)
        (tmp / "model_optim").mkdir()

    def publish() -> None:
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = save_dir / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, save_dir / LATEST)
        fsync_tree(save_dir, recursive=False)
        if save_total_limit:
            _remove_oldest(save_dir, keep=save_total_limit, newest=final)

    try:
        on_rank_zero_agreed(start)
        if save_optimizer:
            sharded = _sharded_state(chunks, optimizer, is_loading=False, layout=OPTIMIZER_LAYOUT)
        else:
            sharded = model_sharded_state(chunks)
        dist_checkpointing.save(sharded, str(tmp / "model_optim"), sharded_strategy=save_strategy(),
                                content_metadata=OPTIMIZER_LAYOUT)  # fmt: skip
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            state = {"iteration": iteration, "consumed_samples": consumed_samples, "scheduler": scheduler.state_dict(),
                     "layout": _parallel_layout(optimizer), "optimizer": save_optimizer}  # fmt: skip
            (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        dist.barrier()
        on_rank_zero_agreed(publish)
    except (OSError, CheckpointException) as exc:  # full disk, quota, permissions
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(save_dir)
        kept = f"the last complete checkpoint, {previous.name}, is intact" if previous else "no checkpoint exists yet"
        raise CheckpointError(
            f"{tmp}: writing checkpoint {final.name} failed ({_write_failure(exc)}); {kept}"
        ) from None
    dist.barrier()
    return final


def _write_failure(exc: BaseException) -> str:
    """What went wrong in a failed save, in a line: the OS error, or each failed rank's first complaint from
    torch's distributed checkpoint (its writer processes report through CheckpointException)."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return "; ".join(f"rank {rank}: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                     for rank, (error, _) in sorted(exc.failures.items()))  # fmt: skip


def _remove_oldest(save_dir: Path, keep: int, newest: Path) -> None:
    """checkpoint.save_total_limit: keep the `keep` most recently written checkpoints, `newest` (the one just
    written, which `latest` names) always among them. Recency is the order of writing, not the iteration
    number: after `latest` was moved back and training resumed, the new checkpoints are the ones to keep."""

    def written(path: Path) -> int:
        state = path / "train_state.json"
        return (state if state.is_file() else path).stat().st_mtime_ns

    others = sorted((p for p in save_dir.glob("iter_*") if p.is_dir() and p != newest), key=written, reverse=True)
    for old in others[keep - 1 :]:
        shutil.rmtree(old)


def load_checkpoint(ckpt_dir: str | Path, chunks, optimizer, scheduler) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns the train state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / "train_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint ({state_file.name} is missing); point "
                              f"{ckpt_dir.parent / LATEST} at a complete iter_* directory")  # fmt: skip
    state = json.loads(state_file.read_text())
    if not state.get("optimizer", True):
        from megatron_swift.config import ConfigError

        raise ConfigError(
            f"{ckpt_dir}: saved with checkpoint.no_save_optim, so it holds no optimizer state to resume; start a "
            f"new run from its weights with model.load={ckpt_dir.parent} and another checkpoint.save directory"
        )
    _check_resume_layout(ckpt_dir, state.get("layout"), optimizer)
    check_distcp_metadata(ckpt_dir / "model_optim")
    layout = dist_checkpointing.load_content_metadata(str(ckpt_dir / "model_optim")) or OPTIMIZER_LAYOUT
    _create_empty_adam_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, is_loading=True, layout=layout)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir / "model_optim"))
    except (CheckpointingException, KeyError) as exc:  # keys or shapes this model and optimizer do not have
        raise CheckpointError(f"{ckpt_dir}: does not fit this job's model and optimizer ({mismatch(exc)})") from None
    restore_model_state(chunks, loaded)
    with torch.no_grad():  # the distributed optimizer copies into views of parameters (fp32: its main params)
        optimizer.load_state_dict(loaded["optimizer"])
    use_fused_torch_adam(optimizer)  # the loaded param groups carry the saving run's options
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt_dir / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on a different world size
        _set_rng_state(load_tensor_file(rng_file))
    return state
