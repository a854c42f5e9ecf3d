"""Fused output projection + cross entropy: the loss and its gradients, never holding [tokens, vocab] logits.

`fused_linear_cross_entropy(hidden, weight, target, token_weight)` returns
sum_t token_weight[t] * CE(hidden[t] @ weight.T, target[t]). The tokens are taken in blocks (all of a
micro-batch's tokens, up to `block_tokens`) and the vocabulary in column chunks of about
`CHUNK_ELEMENTS` logits:

1. pass 1, chunk by chunk: logits (fp32), merged into each token's running max, sum of exponentials
   and target logit (an online softmax over the chunks);
2. the statistics are combined over tensor-parallel ranks (below), giving each token's log-sum-exp
   and loss;
3. pass 2, chunk by chunk: the logits again, turned in place into their gradient
   (softmax - onehot) * token_weight, contracted at once into the hidden-state gradient (accumulated
   over chunks) and into that chunk's rows of the weight gradient (written once per token block).

Chunking the vocabulary rather than the tokens costs one extra logits GEMM (four instead of three) but
touches the weight-sized gradient once per token block instead of once per token chunk, which at a
151k vocabulary is the larger cost on both CPU and GPU. Both gradients are formed during the forward
and only scaled by the incoming gradient in the backward (the loss is a scalar).

Vocab-parallel (tensor parallel) like megatron-core's `vocab_parallel_cross_entropy`: `weight` is this
rank's vocabulary shard starting at global column `vocab_start`; per token block the maxima are
all-reduced (MAX) over `tp_group`, then each rank's sum of exponentials (rescaled to the global max)
and target logit (non-zero only on the owning rank) in one SUM all-reduce. The hidden-state gradient
returned is this rank's partial sum: the caller's tensor-parallel input region (megatron's copy-to /
gather-from region before the output layer) reduces it in its backward, as for ColumnParallelLinear.

Tokens whose target is `ignore_index` or whose weight is 0 add nothing to the loss or the gradients.
Columns at or past `vocab_size` (megatron's TP padding of the vocabulary) are left out entirely (their
weight gradient is 0). Precision follows the unfused path: GEMMs in the weight's dtype, softmax in
fp32, the logit gradient rounded to the weight's dtype; gradients accumulated in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (fp32: 32 MiB); 2048 columns for 4096 tokens
BLOCK_TOKENS = 8192  # beyond this many tokens, blocks (each adds one pass over the weight gradient)
MIN_CHUNK_COLUMNS = 256  # keeps chunks reasonable GEMMs for very long blocks


def _chunk_steps(backend: str):
    if backend == "triton":
        from megatron_swift_kernels.fused_linear_cross_entropy import triton_impl as steps
    elif backend == "torch":
        from megatron_swift_kernels.fused_linear_cross_entropy import reference as steps
    else:
        raise ValueError(f"fused_linear_cross_entropy: no {backend!r} implementation")
    return steps.chunk_stats, steps.chunk_grad_


def _column_chunks(n_valid: int, width: int) -> list[tuple[int, int]]:
    return [(start, min(start + width, n_valid)) for start in range(0, n_valid, width)]


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, ignore_index, vocab_start, vocab_size, tp_group,
                block_tokens, chunk_columns, backend):  # fmt: skip
        chunk_stats, chunk_grad_ = _chunk_steps(backend)
        tokens = hidden.shape[0]
        n_valid = max(0, min(weight.shape[0], vocab_size - vocab_start))  # this shard's real columns
        local_target = torch.where(target != ignore_index, target - vocab_start, -1)
        scale = torch.where(target != ignore_index, token_weight.float(), 0.0)
        inputs = hidden.to(weight.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        width = chunk_columns or max(MIN_CHUNK_COLUMNS, CHUNK_ELEMENTS // min(tokens, block_tokens))
        chunks = _column_chunks(n_valid, width)

        def chunk_logits(block, start, stop, block_target):
            logits = (block @ weight[start:stop].t()).float()
            hit = (block_target >= start) & (block_target < stop)
            return logits, torch.where(hit, block_target - start, -1)

        for first in range(0, tokens, block_tokens):
            rows = slice(first, min(first + block_tokens, tokens))
            block, block_target, block_scale = inputs[rows], local_target[rows], scale[rows]
            row_max = torch.full(block_target.shape, float("-inf"), device=hidden.device)
            sum_exp, target_logit = torch.zeros_like(row_max), torch.zeros_like(row_max)
            for start, stop in chunks:  # pass 1: online softmax statistics over this shard
                logits, hit = chunk_logits(block, start, stop, block_target)
                chunk_max, chunk_sum, chunk_target = chunk_stats(logits, hit)
                new_max = torch.maximum(row_max, chunk_max)
                sum_exp = sum_exp * torch.exp(row_max - new_max) + chunk_sum * torch.exp(chunk_max - new_max)
                row_max, target_logit = new_max, target_logit + chunk_target
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                global_max = row_max.clone()
                dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
                # A shard of padding only has max -inf and sum 0: exp(-inf) keeps it out.
                sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit])
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
                row_max, (sum_exp, target_logit) = global_max, sums
            lse = row_max + torch.log(sum_exp)
            loss_sum += torch.where(block_scale != 0, (lse - target_logit) * block_scale, 0.0).sum()
            grad_block = torch.zeros(block.shape, dtype=torch.float32, device=hidden.device)
            for start, stop in chunks:  # pass 2: gradients
                logits, hit = chunk_logits(block, start, stop, block_target)
                # Rounded to the weight's dtype like the unfused path's logit gradient; fp32 accumulation.
                grad = chunk_grad_(logits, hit, lse, block_scale).to(weight.dtype).float()
                grad_block.addmm_(grad, weight[start:stop].float())
                grad_weight[start:stop].addmm_(grad.t(), block.float())
            grad_hidden[rows] = grad_block
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
        return grad_hidden, grad_weight.to(ctx.weight_dtype), *([None] * 9)


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
    block_tokens: int = BLOCK_TOKENS,
    chunk_columns: int | None = None,
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
    return FusedLinearCrossEntropy.apply(hidden, weight, target, token_weight.reshape(-1), ignore_index, vocab_start,
                                         vocab_size, tp_group, block_tokens, chunk_columns, backend)  # fmt: skip
