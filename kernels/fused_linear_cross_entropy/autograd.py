"""Fused output projection + cross entropy: the loss and its gradients, chunk by chunk over the tokens.

`fused_linear_cross_entropy(hidden, weight, target, token_weight)` returns
sum_t token_weight[t] * CE(hidden[t] @ weight.T, target[t]) without ever holding the [tokens, vocab]
logits: each chunk of tokens gets its logits (fp32), their statistics, and is turned in place into
its logit gradient, which is immediately contracted into the gradients of the hidden states and the
weight. Both gradients are therefore computed during the forward and only scaled by the incoming
gradient in the backward (the loss is a scalar), so the logits are never recomputed.

Vocab-parallel (tensor parallel) like megatron-core's `vocab_parallel_cross_entropy`: `weight` is
this rank's vocabulary shard starting at `vocab_start`; per chunk the row maxima are all-reduced
(MAX) over `tp_group`, then each rank's sum of exponentials (rescaled to the global max) and the
target logit (non-zero only on the owning rank) are all-reduced (SUM) in one call. The hidden-state
gradient returned is this rank's partial sum: the caller's tensor-parallel input region (megatron's
copy-to / gather-from region before the output layer) reduces it in its backward, as for the
unfused ColumnParallelLinear.

Tokens whose target is `ignore_index` or whose weight is 0 add nothing to the loss or the gradients.
Columns at or past `vocab_size` (megatron's TP padding of the vocabulary) are excluded from the
softmax. Precision follows the unfused path: matmuls in the weight's dtype, softmax in fp32, the
weight gradient accumulated in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Logit elements per chunk (fp32: 32 MiB): the chunk's tokens are this divided by the local vocabulary
# (55 tokens at a 151,936 vocabulary on one rank, each chunk still a 55 x hidden x vocab GEMM).
CHUNK_ELEMENTS = 1 << 23


def _chunk_steps(backend: str):
    if backend == "triton":
        from kernels.fused_linear_cross_entropy import triton_impl as steps
    elif backend == "torch":
        from kernels.fused_linear_cross_entropy import reference as steps
    else:
        raise ValueError(f"fused_linear_cross_entropy: no {backend!r} implementation")
    return steps.chunk_stats, steps.chunk_grad_


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, ignore_index, vocab_start, vocab_size, tp_group,
                chunk_tokens, backend):  # fmt: skip
        chunk_stats, chunk_grad_ = _chunk_steps(backend)
        tokens, local_vocab = hidden.shape[0], weight.shape[0]
        n_valid = max(0, min(local_vocab, vocab_size - vocab_start))
        on_shard = (target >= vocab_start) & (target < vocab_start + n_valid) & (target != ignore_index)
        target_local = torch.where(on_shard, target - vocab_start, -1).to(torch.int64)
        scale = torch.where(target != ignore_index, token_weight.float(), 0.0)
        inputs = hidden.to(weight.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for first in range(0, tokens, chunk_tokens):
            rows = slice(first, min(first + chunk_tokens, tokens))
            chunk = inputs[rows]
            logits = (chunk @ weight.t()).float()
            if n_valid:
                row_max, sum_exp, target_logit = chunk_stats(logits, target_local[rows], n_valid)
            else:  # a rank holding only padding columns contributes nothing but joins the all-reduces
                row_max = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
                sum_exp, target_logit = torch.zeros_like(row_max), torch.zeros_like(row_max)
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                global_max = row_max.clone()
                dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
                sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit])
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
                row_max, (sum_exp, target_logit) = global_max, sums
            lse = row_max + torch.log(sum_exp)
            weights = scale[rows]
            loss_sum += torch.where(weights != 0, (lse - target_logit) * weights, 0.0).sum()
            grad_logits = chunk_grad_(logits, target_local[rows], lse, weights, n_valid).to(weight.dtype)
            grad_hidden[rows] = grad_logits @ weight
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), chunk)
            else:
                grad_weight += (grad_logits.t() @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            # In place: the saved gradients are used once (the loss is not backpropagated twice).
            grad_hidden.mul_(grad_loss)
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    tp_group=None,
    chunk_tokens: int | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Scalar fp32 sum over tokens of token_weight * cross entropy of hidden @ weight.T.

    hidden [tokens, h]; weight [local vocab, h] (this rank's shard, first column = global `vocab_start`);
    target [tokens] global ids; token_weight [tokens] (e.g. the loss mask; default ones); vocab_size the
    real global vocabulary (columns past it are padding; default: all columns are real).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    target = target.reshape(-1)
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: {target.shape[0]} targets for {hidden.shape[0]} tokens")
    if token_weight is None:
        token_weight = torch.ones(target.shape, dtype=torch.float32, device=hidden.device)
    if vocab_size is None:
        world = dist.get_world_size(tp_group) if tp_group is not None else 1
        vocab_size = weight.shape[0] * world
    chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return FusedLinearCrossEntropy.apply(hidden, weight, target, token_weight.reshape(-1), ignore_index,
                                         vocab_start, vocab_size, tp_group, chunk_tokens, backend)  # fmt: skip
