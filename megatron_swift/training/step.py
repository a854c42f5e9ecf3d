"""One optimizer step through megatron-core's schedules, with a token-weighted loss.

The loss is the sum of per-token cross entropy over loss-masked tokens; megatron-core's
`calculate_per_token_loss` divides gradients by the global token count in `finalize_model_grads`,
so the step is the exact token mean over the whole global batch whatever the split into data-parallel
ranks, micro-batches, pipeline or context-parallel chunks. The last stage gets the per-token loss from
the model itself (`labels=`: megatron-core's loss path, padding columns masked by models/gpt.py).

With `model.fused_linear_cross_entropy` the chunks are FusedLossGPTModel (models/kernel_modules.py):
in training their last stage returns the output layer's input instead of logits, and the same loss is
computed by the fused linear + cross-entropy op from those hidden states and the output weight,
vocab-parallel over the TP group, without the [tokens, vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_swift.distributed.runtime import comm_device
from megatron_swift.training.optim import current_lr


@dataclass
class StepResult:
    loss: float  # token-mean loss over the global batch (preference: mean over its pairs)
    tokens: int  # loss tokens in the global batch (preference: pairs)
    grad_norm: float
    lr: float
    skipped: bool
    router_losses: dict[str, float] = field(default_factory=dict)  # MoE: see training/moe_metrics.py
    metrics: dict[str, float] = field(default_factory=dict)  # the task's own (preference: rewards/..., logps/...)


MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked token-sum of the per-token cross entropy [b, s] the model computed from the labels.

    The model (models/gpt.py) excludes megatron's vocabulary padding from the softmax, so this is
    the HF model's loss exactly.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _fused_loss_func(loss_mask: torch.Tensor, labels: torch.Tensor, vocab_size: int, core_model, hidden):
    """`_loss_func` from hidden states [b, s, h]: the output projection is fused into the loss."""
    from megatron.core import parallel_state as ps

    from megatron_swift_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    weight = core_model.output_weight()
    mask = loss_mask.reshape(-1).float()
    loss_sum = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        mask,
        vocab_start=ps.get_tensor_model_parallel_rank() * weight.shape[0],
        vocab_size=vocab_size,
        tp_group=ps.get_tensor_model_parallel_group(),
        backend=core_model.loss_backend,
    )
    return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def packed_seq_params(cu_seqlens: torch.Tensor):
    """megatron-core's THD description of one packed micro-batch (document offsets into its tokens)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)  # fmt: skip


def _forward_step(data_iterator, model, vocab_size: int):
    from megatron.core.utils import get_batch_on_this_cp_rank, unwrap_model

    from megatron_swift.models.kernel_modules import FusedLossGPTModel

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    # A vision-language model's images / videos (models/vlm.py): whole, whatever the layout (CP is refused).
    media = {key: batch.pop(key) for key in MEDIA_KEYS if key in batch}
    packed = None
    if "cu_seqlens" in batch:
        # Packed (THD): all documents of the micro-batch as one row; megatron-core restarts rotary
        # positions and the attention restarts its causal mask at every cu_seqlens offset. (Multimodal
        # rope's positions [3, b, s] come restarted per document from the collate.)
        packed = packed_seq_params(batch.pop("cu_seqlens"))
        batch = {key: value.reshape(*value.shape[:-2], 1, -1) for key, value in batch.items()}
    core_model = unwrap_model(model)
    if "position_ids" not in batch:
        seq = batch["tokens"].shape[1]
        batch["position_ids"] = torch.arange(seq, device=device).unsqueeze(0).expand_as(batch["tokens"])
        if core_model.position_embedding_type == "mrope":  # text only: the same position on all three axes
            batch["position_ids"] = batch["position_ids"].unsqueeze(0).expand(3, -1, -1)
    if packed is None:
        batch = get_batch_on_this_cp_rank(batch)  # CP: this rank's two load-balanced sequence chunks
    if isinstance(core_model, FusedLossGPTModel) and core_model.returns_hidden_states():
        # Without labels its last stage returns the output layer's input [b, s, h]; the fused loss is ours.
        output = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed)
        return output, partial(_fused_loss_func, batch["loss_mask"], batch["labels"], vocab_size, core_model)
    # With labels the last stage returns the per-token loss [b, s] (models/gpt.py).
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed,
                   **media)  # fmt: skip
    return output, partial(_loss_func, batch["loss_mask"])


def global_loss_sum(losses: list[dict]) -> tuple[float, int]:
    """(loss sum, loss tokens) over micro-batches and data/context-parallel ranks; sent from the last stage.

    The report lives on comm_device(): megatron's data-parallel and pipeline groups are NCCL on GPU."""
    from megatron.core import parallel_state as ps

    report = torch.zeros(2, dtype=torch.float64, device=comm_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            report += item["lm loss"].detach().double()
        dist.all_reduce(report, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            report, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    loss_sum, tokens = report.tolist()
    return loss_sum, int(tokens)


def run_schedule(chunks, microbatches: list[dict], vocab_size: int, forward_only: bool) -> list[dict]:
    """megatron-core's schedule over this rank's micro-batches: the per-micro-batch loss reports."""
    return run_forward_backward(chunks, microbatches, partial(_forward_step, vocab_size=vocab_size), forward_only)


def run_forward_backward(chunks, microbatches: list[dict], forward_step_func, forward_only: bool) -> list[dict]:
    """megatron-core's schedule over this rank's micro-batches with `forward_step_func`: what its loss
    functions report, one entry per micro-batch (on the last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batch_size, seq_length = microbatches[0]["tokens"].shape
    if "cu_seqlens" in microbatches[0]:  # packed micro-batches travel as one [1, mbs * seq] row
        micro_batch_size, seq_length = 1, micro_batch_size * seq_length
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(chunks, optimizer, scheduler, microbatches: list[dict], vocab_size: int) -> StepResult:
    from megatron_swift.training.moe_metrics import router_losses

    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(chunks, microbatches, vocab_size, forward_only=False)
    lr = current_lr(optimizer)  # the rate this step uses
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    loss_sum, tokens = global_loss_sum(losses)
    router = router_losses(chunks[0].config, len(microbatches))
    return StepResult(loss_sum / max(tokens, 1), tokens, float(grad_norm or 0.0), lr, not updated, router)
