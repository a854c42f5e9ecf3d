"""Wrap model chunks for training: megatron-core DDP, optimizer (optionally distributed) and LR schedule."""

from __future__ import annotations

from megatron_swift.training.config import JobConfig


def wrap_for_training(chunks: list, job: JobConfig):
    """(DDP-wrapped chunks, MegatronOptimizer, OptimizerParamScheduler) for `chunks`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    t = job.train
    config = chunks[0].config
    if t.bf16 or t.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
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
        ),
        ddp_chunks,
    )
    warmup = int(t.lr_warmup_fraction * t.train_iters) if t.lr_warmup_fraction is not None else t.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    # What megatron-core's schedules call back into (as Megatron-LM's training loop sets them).
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return ddp_chunks, optimizer, scheduler
