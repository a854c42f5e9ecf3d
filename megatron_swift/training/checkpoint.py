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

import contextlib
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
from megatron_swift.compat import compact_param_index_maps
from megatron_swift.fs import fsync_tree
from megatron_swift.training.optim import inner_optimizers, torch_adams, use_fused_torch_adam


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# How the distributed optimizer's state is laid out in a checkpoint (checkpoint.optimizer_layout), as the
# metadata megatron-core's `sharded_state_dict` takes; stored with the checkpoint as its content metadata and
# read back from there on load, so checkpoints of either layout load. Other optimizers ignore it.
# megatron-core's own default (`fully_sharded_model_space`, flattened ranges) cannot be written by torch_dist.
OPTIMIZER_LAYOUTS = {
    # Adam's state in model space: one tensor per parameter and state, keyed and sharded like the parameter,
    # so the run resumes at any TP / PP / VPP / EP / DP. On save each data-parallel group's state is gathered
    # (over gloo, into CPU memory: `mem_efficient`) on its DP rank 0, which writes it; on load every rank reads
    # all of its TP / PP share and keeps its own DP shard.
    "fully_reshardable": {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "chained_optim_avoid_prefix": True,
    },
    # Each rank writes its own flat shard of the optimizer's buckets (no gather; Megatron-LM's default): the
    # run resumes at another data-parallel size only.
    "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
}
# Checkpoints written before the layout was stored (none used the distributed optimizer) load as before.
_UNRECORDED_LAYOUT = OPTIMIZER_LAYOUTS["dp_reshardable"]


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


def _check_resume_layout(ckpt_dir: Path, saved: dict | None, layout: dict, optimizer) -> None:
    """A distributed-optimizer checkpoint resumes with the distributed optimizer, and a `dp_reshardable` one
    only with its tensor / pipeline / expert layout (its state follows the saving run's bucket layout); another
    optimizer's checkpoint does not resume across EP 1 and EP > 1."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_swift.config import ConfigError

    if not saved:
        return
    now = _parallel_layout(optimizer)
    if not saved["use_distributed_optimizer"]:
        # torch's optimizer states, one per optimizer of megatron's chain, whose experts' own one exists at EP > 1
        # only (the distributed optimizer's state is refitted: _fit_to_optimizer_chain).
        was, now_ep = saved["expert_model_parallel_size"], now["expert_model_parallel_size"]
        if (was > 1) != (now_ep > 1):
            raise ConfigError(
                f"{ckpt_dir}: its optimizer state (without train.use_distributed_optimizer) holds the experts' "
                f"apart from the rest only at expert parallel > 1; parallel.expert_model_parallel_size: saved "
                f"{was}, now {now_ep}. Resume at {'EP > 1' if was > 1 else 'EP 1'}, or start a new run from its "
                f"weights with model.load={ckpt_dir.parent} (the optimizer restarts)"
            )
        return
    sharding = layout.get("distrib_optim_sharding_type")
    reshardable = sharding in DistributedOptimizer.checkpoint_fully_reshardable_formats
    fixed = ["use_distributed_optimizer"] if reshardable else list(saved)
    changed = [f"{'train' if key == 'use_distributed_optimizer' else 'parallel'}.{key}: saved {saved[key]}, "
               f"now {now[key]}" for key in fixed if now[key] != saved[key]]  # fmt: skip
    if not changed:
        return
    if reshardable:
        raise ConfigError(
            f"{ckpt_dir}: its optimizer state is the distributed optimizer's; {'; '.join(changed)}. Resume with "
            f"it, or start a new run from its weights with model.load={ckpt_dir.parent} (the optimizer restarts)"
        )
    raise ConfigError(
        f"{ckpt_dir}: its distributed-optimizer state is stored per data-parallel shard ({sharding}) and resumes "
        f"only with the same layout (the data-parallel size may change); {'; '.join(changed)}. Resume with the "
        f"saved layout, or start a new run from its weights with model.load={ckpt_dir.parent} (the optimizer "
        "restarts). Checkpoints written with checkpoint.optimizer_layout=fully_reshardable resume at any layout"
    )


def _check_lora_resume(ckpt_dir: Path, saved: dict | None, chunks) -> None:
    """LoRA adapters on a gated linear_fc1 resume only at the tensor-parallel size they were saved at.

    Why: at TP > 1 such an adapter's lora_B holds this rank's gate rows, then its up rows (as the base weight
    does), and tuners/lora/layers.py stores it as a plain split of its rows, while megatron-core stores the
    base weight through its SwiGLU factory: read at another TP size, gate and up rows mix (a TP2 -> TP1
    resume was 0.6% off). Experts' adapters are never split (LoRA needs expert-TP 1).
    """
    from megatron.core import parallel_state as ps

    from megatron_swift.config import ConfigError
    from megatron_swift.tuners.lora.layers import LoraLinear

    saved_tp, now_tp = (saved or {}).get("tensor_model_parallel_size"), ps.get_tensor_model_parallel_world_size()
    if saved_tp in (None, now_tp):
        return
    gated = [name for chunk in chunks for name, module in chunk.named_modules()
             if isinstance(module, LoraLinear) and name.endswith("linear_fc1") and ".local_experts." not in name
             and module.base_layer.config.gated_linear_unit]  # fmt: skip
    if gated:
        raise ConfigError(
            f"{ckpt_dir}: its LoRA adapters on gated linear_fc1 layers are stored in the row order of their "
            f"tensor-parallel split and resume only at the saved size (parallel.tensor_model_parallel_size: saved "
            f"{saved_tp}, now {now_tp})"
        )


def _sharded_state(chunks, optimizer, is_loading: bool, layout: dict) -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    model = model_sharded_state(chunks)
    fully_reshardable = layout.get("distrib_optim_sharding_type") == "fully_reshardable"
    distributed = [inner for inner in inner_optimizers(optimizer) if isinstance(inner, DistributedOptimizer)]
    with compact_param_index_maps(distributed if fully_reshardable else []):  # megatron's bug: see compat
        # The optimizer finds each parameter's sharded tensor among all of them (nested: with virtual pipeline
        # stages, model0 and model1 hold tensors under the same keys, which a merged dict would lose).
        optimizer_state = optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=layout)
    # Saving fully_reshardable, only DP rank 0 holds the gathered state; the others' `param_state: None` would
    # make megatron's check of the common state warn, on every save, that theirs differs from rank 0's.
    for part in (optimizer_state, *optimizer_state.values()):
        if isinstance(part, dict) and "param_state" in part and part["param_state"] is None:
            del part["param_state"]
    return {**model, "optimizer": optimizer_state}


def _fit_to_optimizer_chain(state: dict, optimizer) -> dict:
    """A loaded `fully_reshardable` optimizer state in the shape of this run's chain of optimizers.

    Why: megatron-core gives expert parameters an optimizer of their own at expert parallel > 1 and keeps them in
    the dense one at EP 1, and a ChainedOptimizer's state is {index: each optimizer's state}, or the state of its
    only optimizer. The parameter state (`param_state`) is keyed by parameter and loads in this run's shape; the
    rest (param groups with the step, loss scaler) is the saving run's, one entry per optimizer it had. When
    the chains differ, every optimizer here gets all the saved param groups, each also under the other
    `is_expert_parallel` (part of megatron's group identity, with the weight-decay and learning-rate multipliers).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = inner_optimizers(optimizer)
    if not all(isinstance(inner, DistributedOptimizer) for inner in chain):  # others' states are torch's
        return state
    saved = (
        [state]
        if "optimizer" in state
        else [state[index] for index in sorted(key for key in state if isinstance(key, int))]
    )
    if len(saved) == len(chain):
        return state
    param_states = (
        [state["param_state"]] if len(chain) == 1 else [state[index]["param_state"] for index in range(len(chain))]
    )
    groups = [group for part in saved for group in part["optimizer"]["param_groups"]]
    # megatron looks groups up in a dict built in this order: a saved group wins over another's twin.
    groups = [{**group, "is_expert_parallel": not group["is_expert_parallel"]} for group in groups] + groups
    common = {key: value for key, value in saved[0].items() if not isinstance(key, int)}  # not this run's parts
    fitted = [{**common, "optimizer": {**common["optimizer"], "param_groups": groups}, "param_state": param_state}
              for param_state in param_states]  # fmt: skip
    return fitted[0] if len(chain) == 1 else dict(enumerate(fitted))


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


@contextlib.contextmanager
def _adam_steps_set_aside(optimizer):
    """Around megatron's `load_state_dict`: torch's Adam loads its state without the `step` that megatron-core
    keeps in the param groups (`_restore_adam_steps` gives it back afterwards).

    Why: without Apex/TE, megatron-core's DistributedOptimizer puts ONE step tensor into every parameter's
    state, then copies its loaded parameter state into every key that state holds: under `dp_reshardable`
    that overwrote the step with the value the state had before loading; under `fully_reshardable` the
    loaded state has no step and the copy fails (KeyError 'step'). A post-hook of torch's `load_state_dict`
    (public API) takes the step out before megatron's copy. Only where the param group records the step
    (megatron's distributed optimizer): others load per-parameter steps as torch saved them.
    """

    def drop_steps(adam) -> None:
        for group in adam.param_groups:
            if "step" in group:
                for param in group["params"]:
                    adam.state.get(param, {}).pop("step", None)

    handles = [adam.register_load_state_dict_post_hook(drop_steps) for adam in torch_adams(optimizer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter of a torch Adam its own `step` tensor, with the step the checkpoint recorded.

    Why: torch's Adam increments each parameter's step in place, so they must not share one tensor, and a
    stale step means wrong bias corrections (a resumed run's second step was 0.8% off the straight run's).
    megatron-core's distributed optimizer records the checkpoint's step in the param groups.
    """
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            # torch keeps the step on the parameter's device for its fused kernel, on the CPU otherwise.
            on_param = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                if adam.state.get(param):
                    device = param.device if on_param else "cpu"
                    adam.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32, device=device)


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
    optimizer_layout: str = "fully_reshardable",
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Without `save_optimizer` (checkpoint.no_save_optim) only the model is written: a smaller checkpoint
    to export or start a new run from (`model.load`), which a run cannot resume. `optimizer_layout`: a key of
    OPTIMIZER_LAYOUTS (checkpoint.optimizer_layout)."""
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
        layout = OPTIMIZER_LAYOUTS[optimizer_layout]
        if save_optimizer:
            sharded = _sharded_state(chunks, optimizer, is_loading=False, layout=layout)
        else:
            sharded = model_sharded_state(chunks)
        dist_checkpointing.save(sharded, str(tmp / "model_optim"), sharded_strategy=save_strategy(),
                                content_metadata=layout)  # fmt: skip
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
    check_distcp_metadata(ckpt_dir / "model_optim")
    layout = dist_checkpointing.load_content_metadata(str(ckpt_dir / "model_optim")) or _UNRECORDED_LAYOUT
    _check_resume_layout(ckpt_dir, state.get("layout"), layout, optimizer)
    _check_lora_resume(ckpt_dir, state.get("layout"), chunks)
    _create_empty_adam_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, is_loading=True, layout=layout)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir / "model_optim"))
    except (CheckpointingException, KeyError) as exc:  # keys or shapes this model and optimizer do not have
        raise CheckpointError(f"{ckpt_dir}: does not fit this job's model and optimizer ({mismatch(exc)})") from None
    restore_model_state(chunks, loaded)
    if layout.get("distrib_optim_sharding_type") == "fully_reshardable":
        loaded["optimizer"] = _fit_to_optimizer_chain(loaded["optimizer"], optimizer)
    # The distributed optimizer copies into views of parameters (fp32: its main params).
    with torch.no_grad(), _adam_steps_set_aside(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    use_fused_torch_adam(optimizer)  # the loaded param groups carry the saving run's options
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt_dir / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on a different world size
        _set_rng_state(load_tensor_file(rng_file))
    return state
