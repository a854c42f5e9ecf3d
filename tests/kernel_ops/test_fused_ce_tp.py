"""Acceptance 2: the fused linear + cross-entropy at TP2 (gloo) equals the unfused vocab-parallel loss.

Both sides are the training loss on the same inputs in one two-rank launch: the unfused one as
GPTModel computes it from this rank's logits shard (models/gpt.py: padding masked, then megatron-core's
vocab_parallel_cross_entropy; training/step.py's `_loss_func`), the fused one (`_fused_loss_func`) from the
hidden states and this rank's weight shard. The hidden states enter through megatron's
copy-to-tensor-parallel region, as the output layer's input does, so the hidden-state gradient
compared is the TP-reduced one. Cases: padding columns in the last shard, and a shard of padding only.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_swift.distributed import run_workers

TOL = 1e-5


def _inputs(tokens: int, hidden: int, vocab: int, real_vocab: int):
    gen = torch.Generator().manual_seed(vocab)
    h = torch.randn(2, tokens // 2, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.3
    labels = torch.randint(0, real_vocab, (2, tokens // 2), generator=gen)
    mask = (torch.rand(2, tokens // 2, generator=gen) > 0.2).float()
    return h, weight, labels, mask


def _compare_on_tp2(cases: list[tuple[int, int, int, int]], backends: list[str]) -> list[dict]:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.gpt import mask_vocab_padding
    from megatron_swift.training.step import _fused_loss_func, _loss_func

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    rank, errors = ps.get_tensor_model_parallel_rank(), []
    try:
        for tokens, hidden, vocab, real_vocab in cases:
            h_full, weight_full, labels, mask = _inputs(tokens, hidden, vocab, real_vocab)
            local = vocab // 2
            shard = weight_full[rank * local : (rank + 1) * local]

            def run(loss_of, h_full=h_full, shard=shard):
                h, weight = h_full.clone().requires_grad_(), shard.clone().requires_grad_()
                loss_sum, tokens_counted, _ = loss_of(h, weight)
                (loss_sum * 0.5).backward()
                return loss_sum.detach(), int(tokens_counted), h.grad, weight.grad

            def unfused(h, weight, labels=labels, mask=mask, real_vocab=real_vocab):
                # [s, b, h] -> [s, b, vocab / tp], as the output layer makes them. The TP region's gradient
                # must arrive contiguous: megatron-core's `_reduce` all-reduces `grad.contiguous()` but
                # returns `grad`, so a non-contiguous one would come back unreduced.
                logits = copy_to_tensor_model_parallel_region(h.transpose(0, 1).contiguous()) @ weight.t()
                logits = mask_vocab_padding(logits, real_vocab)
                per_token = vocab_parallel_cross_entropy(logits, labels.t().contiguous())
                return _loss_func(mask, per_token.t())

            expected = run(unfused)
            for backend in backends:

                def fused(h, weight, backend=backend, labels=labels, mask=mask, real_vocab=real_vocab):
                    model = SimpleNamespace(output_weight=lambda: weight, loss_backend=backend)
                    return _fused_loss_func(mask, labels, real_vocab, model, copy_to_tensor_model_parallel_region(h))

                got = run(fused)
                assert got[1] == expected[1]
                errors.append({
                    "case": (tokens, hidden, vocab, real_vocab), "backend": backend, "rank": rank,
                    **{name: ((g - e).norm() / e.norm()).item()
                       for name, g, e in zip(("loss", "_", "grad_hidden", "grad_weight"), got, expected, strict=True)
                       if name != "_" and e.norm() > 0},
                    "grad_weight_abs": (got[3] - expected[3]).abs().max().item(),
                })  # fmt: skip
    finally:
        destroy_distributed()
    return errors


def test_fused_linear_cross_entropy_at_tp2_equals_vocab_parallel_loss():
    # (tokens, hidden, padded vocab, real vocab): last shard partly padding; second shard all padding.
    cases, backends = [(24, 16, 96, 90), (10, 8, 64, 30)], ["torch", "triton"]
    results = [row for rank_rows in run_workers(_compare_on_tp2, 2, cases, backends) for row in rank_rows]
    assert len(results) == 2 * len(cases) * len(backends)
    failures = [r for r in results if max(v for k, v in r.items() if k in ("loss", "grad_hidden", "grad_weight")) > TOL
                or r["grad_weight_abs"] > TOL]  # fmt: skip
    assert not failures, failures
