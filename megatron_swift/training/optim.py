"""Wrap model chunks for training: megatron-core DDP, optimizer (optionally distributed) and LR schedule."""

from __future__ import annotations

import contextlib

import torch

from megatron_swift.training.config import JobConfig


def wrap_for_training(chunks: list, job: JobConfig):
    """(DDP-wrapped chunks, MegatronOptimizer, OptimizerParamScheduler) for `chunks`. A vision-language model's ViT
    and aligner may have learning rates of their own (training/vision_tuning.py)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    t = job.train
    config = chunks[0].config
    vision = getattr(chunks[0], "vision_spec", None)  # models/vlm.py (read before any wrapping)
    if t.bf16 or t.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=t.overlap_grad_reduce,
        overlap_param_gather=t.overlap_param_gather,
        # As Megatron-LM: every pipeline stage launches its first all-gather from the schedule.
        align_param_gather=t.overlap_param_gather,
        bucket_size=t.ddp_bucket_size,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    overrides = None
    if vision is not None:
        from megatron_swift.training.vision_tuning import lr_overrides

        overrides = lr_overrides(vision, t, optimizer_config)
    optimizer = get_megatron_optimizer(optimizer_config, ddp_chunks, config_overrides=overrides)
    use_fused_torch_adam(optimizer)
    decay_iters = t.lr_decay_iters or t.train_iters
    warmup = int(t.lr_warmup_fraction * decay_iters) if t.lr_warmup_fraction is not None else t.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_iters,
        lr_decay_style=t.lr_decay_style,
        wsd_decay_steps=t.lr_wsd_decay_iters,
        lr_wsd_decay_style=t.lr_wsd_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    # What megatron-core's schedules call back into (as Megatron-LM's training loop sets them).
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _one_or_list([chunk.no_sync for chunk in ddp_chunks])
    if t.overlap_grad_reduce:
        # Launch each chunk's gradient reduction from the schedule as its last micro-batch's backward ends.
        config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in ddp_chunks])
    if t.overlap_param_gather:
        config.param_sync_func = _one_or_list([chunk.start_param_sync for chunk in ddp_chunks])
    return ddp_chunks, optimizer, scheduler


def use_fused_torch_adam(optimizer) -> None:
    """Run torch's fused Adam kernel wherever megatron-core fell back to torch's Adam.

    Why: without Apex or Transformer Engine (CPU, or a bare GPU install) megatron-core builds
    `torch.optim.Adam`/`AdamW` without `fused`, and on CPU torch then takes its per-parameter Python loop
    (about ten ops per parameter per step). The fused kernel does the same update in one call per step;
    it is also what HF's Trainer uses by default. Options live in the param groups, so setting `fused`
    there (and again after a checkpoint load restores the saved groups) is all it takes. With Apex's or
    TE's FusedAdam (the GPU installs) there is nothing to do.
    """
    for adam in torch_adams(optimizer):
        params = [param for group in adam.param_groups for param in group["params"]]
        if not all(param.device.type in ("cpu", "cuda") and param.is_floating_point() for param in params):
            continue
        adam.defaults.update(fused=True, foreach=False)
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)


def current_lr(optimizer) -> float:
    """The rate this step uses: that of the groups on the default schedule (a vision-language model's ViT and
    aligner may have groups of their own, training/vision_tuning.py), as megatron-core logs it."""
    groups = optimizer.param_groups
    return next((group["lr"] for group in groups if group.get("default_config", True)), groups[0]["lr"])


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer` (a ChainedOptimizer holds one per parameter kind)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def torch_adams(optimizer) -> list:
    """The torch Adam / AdamW instances megatron-core built (without Apex or TE) inside `optimizer`."""
    adams = [inner.optimizer for inner in inner_optimizers(optimizer)]
    return [adam for adam in adams if isinstance(adam, torch.optim.Adam | torch.optim.AdamW)]


def _one_or_list(funcs: list):
    return funcs[0] if len(funcs) == 1 else funcs


@contextlib.contextmanager
def parameters_synced(chunks):
    """The body sees every data-parallel rank's updated parameters.

    With `overlap_param_gather` the optimizer step updates only this rank's shard; the other shards
    arrive by all-gathers that the next forward waits for. Saving a checkpoint (or reading weights in
    any other way) must first finish them: this does, and re-arms the overlap afterwards.
    """
    overlapped = [chunk for chunk in chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()
