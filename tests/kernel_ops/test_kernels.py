"""Acceptance 1: every Triton kernel equals its pure-torch reference, outputs and gradients.

Run through Triton's interpreter on CPU (see conftest.py). Fresh random inputs per case, shapes that
include non-powers of two and multi-block / partial-block cases, fp32 (<= 1e-5) and bf16 (<= 1e-2).
Each launcher is handed its output buffers filled with NaN, so an element the kernel fails to write
fails the comparison. Errors are relative to the reference's norm: ||out - ref|| / ||ref||.

Interpreter fidelity notes (Triton 3.9): the interpreter multiplies bf16 by bf16 wrongly, so every
kernel computes in fp32 and touches bf16 only at loads and stores (as GPU code does anyway); and it
converts fp32 to bf16 by truncation where a GPU rounds to nearest, which costs up to one bf16 ulp
per stored element, well inside the bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from megatron_swift_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_swift_kernels.fused_linear_cross_entropy import reference as ce_reference
from megatron_swift_kernels.rmsnorm import rms_norm
from megatron_swift_kernels.rmsnorm.reference import rms_norm as rms_norm_reference
from megatron_swift_kernels.rotary import apply_rotary, apply_rotary_thd
from megatron_swift_kernels.rotary import reference as rotary_reference
from megatron_swift_kernels.swiglu import swiglu
from megatron_swift_kernels.swiglu.reference import swiglu as swiglu_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert not out.isnan().any(), "unwritten (poisoned) or NaN elements in the kernel output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, what: str):
    err = relative_error(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def poisoned(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.full(shape or like.shape, float("nan"), dtype=dtype or like.dtype)


def reference_grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("dtype", DTYPES)
# programs / tile_rows (a power of two): the backward's split into programs walking several row tiles.
@pytest.mark.parametrize("rows,hidden,programs,tile_rows", [(1, 8, 1, None), (7, 96, 2, 1), (33, 100, 4, 2),
                                                             (5, 257, 3, None)])  # fmt: skip
def test_rmsnorm(rows, hidden, programs, tile_rows, dtype):
    from megatron_swift_kernels.rmsnorm.triton_impl import rmsnorm_backward, rmsnorm_forward

    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    dy = torch.randn(rows, hidden, generator=gen).to(dtype)
    eps = 1e-6
    ref_y, (ref_dx, ref_dw) = reference_grads(lambda a, w: rms_norm_reference(a, w, eps), [x, weight], dy)

    y, rstd = rmsnorm_forward(x, weight, eps, out=poisoned(x), rstd=poisoned(x, (rows,), torch.float32))
    assert_close(y, ref_y, dtype, "forward")
    dx, dw = rmsnorm_backward(dy, x, weight, rstd, dx=poisoned(x), programs=programs, rows_per_tile=tile_rows)
    assert_close(dx, ref_dx, dtype, "input gradient")
    assert_close(dw, ref_dw, dtype, "weight gradient")

    # The autograd wrapper (what the model uses) on a 3-d input.
    x3, dy3 = x.view(1, rows, hidden), dy.view(1, rows, hidden)
    y3, (dx3, dw3) = reference_grads(lambda a, w: rms_norm(a, w, eps, "triton"), [x3, weight], dy3)
    assert_close(y3, ref_y.view(1, rows, hidden), dtype, "autograd forward")
    assert_close(dx3, ref_dx.view(1, rows, hidden), dtype, "autograd input gradient")
    assert_close(dw3, ref_dw, dtype, "autograd weight gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,ffn,block", [(1, 4, 4), (5, 37, 16), (16, 300, 128)])
def test_swiglu(rows, ffn, block, dtype):
    from megatron_swift_kernels.swiglu.triton_impl import swiglu_backward, swiglu_forward

    gen = torch.Generator().manual_seed(rows * ffn)
    x = torch.randn(rows, 2 * ffn, generator=gen).to(dtype)
    dy = torch.randn(rows, ffn, generator=gen).to(dtype)
    ref_y, (ref_dx,) = reference_grads(swiglu_reference, [x], dy)

    y = swiglu_forward(x, out=poisoned(x, (rows, ffn)), block=block)
    assert_close(y, ref_y, dtype, "forward")
    dx = swiglu_backward(x, dy, dx=poisoned(x), block=block)
    assert_close(dx, ref_dx, dtype, "gradient")

    y3, (dx3,) = reference_grads(lambda a: swiglu(a, "triton"), [x.view(rows, 1, -1)], dy.view(rows, 1, -1))
    assert_close(y3, ref_y.view(rows, 1, -1), dtype, "autograd forward")
    assert_close(dx3, ref_dx.view(rows, 1, -1), dtype, "autograd gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_torch_backend_is_the_reference_bitwise(dtype):
    """The `torch` backend's hand-written backward does the reference's ops in its order: equal bits."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 2 * 37, generator=gen).to(dtype)  # [s, b, 2 * ffn] as megatron's fc1 returns it
    dy = torch.randn(3, 6, 37, generator=gen).to(dtype).transpose(0, 1)  # a non-contiguous incoming gradient
    ref_y, (ref_dx,) = reference_grads(swiglu_reference, [x], dy)
    y, (dx,) = reference_grads(lambda a: swiglu(a, "torch"), [x], dy)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=0)


class _SingleRankGroup:
    """megatron's THD rotary asks its CP group for size and rank only."""

    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,batch,heads,head_dim,rot_dim", [(4, 1, 2, 8, 8), (7, 3, 5, 24, 16), (9, 2, 3, 40, 40)])
def test_rotary_standard_layout(seq, batch, heads, head_dim, rot_dim, dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_swift_kernels.rotary.triton_impl import rotary_apply

    gen = torch.Generator().manual_seed(seq * head_dim)
    t = torch.randn(seq, batch, heads, head_dim, generator=gen).to(dtype)
    freqs = torch.randn(seq + 3, 1, 1, rot_dim, generator=gen)
    dy = torch.randn(t.shape, generator=gen).to(dtype)
    ref_y, (ref_dt,) = reference_grads(lambda a: rotary_reference.apply_rotary(a, freqs), [t], dy)
    # Our reference is megatron-core's convention (the function megatron's attention calls without fusion).
    torch.testing.assert_close(ref_y, _apply_rotary_pos_emb_bshd(t, freqs[:seq]), rtol=0, atol=0)

    cos, sin = rotary_reference.rotary_tables(freqs[:seq], dtype)
    positions = torch.arange(seq, dtype=torch.int32).repeat_interleave(batch)
    tokens = (seq * batch, heads, head_dim)
    y = rotary_apply(t.reshape(tokens), cos, sin, positions, out=poisoned(t, tokens))
    assert_close(y.view(t.shape), ref_y, dtype, "forward")
    dt = rotary_apply(dy.reshape(tokens), cos, sin, positions, backward=True, out=poisoned(t, tokens))
    assert_close(dt.view(t.shape), ref_dt, dtype, "gradient")

    y2, (dt2,) = reference_grads(lambda a: apply_rotary(a, freqs, backend="triton"), [t], dy)
    assert_close(y2, ref_y, dtype, "autograd forward")
    assert_close(dt2, ref_dt, dtype, "autograd gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu_seqlens,heads,head_dim,rot_dim", [([0, 5, 6, 13], 3, 24, 16), ([0, 8, 11], 2, 10, 10)])
def test_rotary_packed_thd(cu_seqlens, heads, head_dim, rot_dim, dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    from megatron_swift_kernels.rotary.triton_impl import rotary_apply

    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    total, longest = cu_seqlens[-1], int((cu[1:] - cu[:-1]).max())
    gen = torch.Generator().manual_seed(total * head_dim)
    t = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    freqs = torch.randn(longest, 1, 1, rot_dim, generator=gen)
    dy = torch.randn(t.shape, generator=gen).to(dtype)
    ref_y, (ref_dt,) = reference_grads(lambda a: rotary_reference.apply_rotary_thd(a, cu, freqs), [t], dy)
    torch.testing.assert_close(ref_y, _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_SingleRankGroup()),
                               rtol=0, atol=0)  # fmt: skip
    positions = rotary_reference.thd_positions(cu, total)
    assert positions.tolist()[: cu_seqlens[1] + 1] == [*range(cu_seqlens[1]), 0]  # restart per document

    cos, sin = rotary_reference.rotary_tables(freqs, dtype)
    y = rotary_apply(t, cos, sin, positions.to(torch.int32), out=poisoned(t))
    assert_close(y, ref_y, dtype, "forward")
    dt = rotary_apply(dy, cos, sin, positions.to(torch.int32), backward=True, out=poisoned(t))
    assert_close(dt, ref_dt, dtype, "gradient")

    y2, (dt2,) = reference_grads(lambda a: apply_rotary_thd(a, cu, freqs, backend="triton"), [t], dy)
    assert_close(y2, ref_y, dtype, "autograd forward")
    assert_close(dt2, ref_dt, dtype, "autograd gradient")


@pytest.mark.parametrize("rows,n_cols,block", [(5, 37, 16), (9, 300, 64), (3, 1, 8), (70, 20, 32)])
def test_cross_entropy_chunk_steps(rows, n_cols, block, monkeypatch):
    """The two per-chunk kernels of the fused loss against their torch versions (fp32 logits always)."""
    from megatron_swift_kernels.fused_linear_cross_entropy import triton_impl

    monkeypatch.setattr(triton_impl, "BLOCK", block)  # several vocabulary blocks per row
    gen = torch.Generator().manual_seed(rows * n_cols)
    logits = torch.randn(rows, n_cols, generator=gen) * 4
    target = torch.randint(0, n_cols, (rows,), generator=gen)
    target[0] = -1  # not in this chunk
    stats = triton_impl.chunk_stats(logits, target, out=tuple(poisoned(logits, (rows,)) for _ in range(3)))
    ref_stats = ce_reference.chunk_stats(logits.clone(), target)  # the torch version works in place
    for name, got, want in zip(("max", "sum_exp", "target_logit"), stats, ref_stats, strict=True):
        assert_close(got, want, torch.float32, name)
    lse = ref_stats[0] + ref_stats[1].log()
    scale = torch.rand(rows, generator=gen)
    grad = triton_impl.chunk_grad_(logits.clone(), target, lse, scale)
    assert_close(grad, ce_reference.chunk_grad_(logits.clone(), target, lse, scale), torch.float32, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
# block_tokens / chunk_columns: several token blocks and vocabulary chunks, with partial last ones.
@pytest.mark.parametrize("tokens,hidden,vocab,real_vocab,block_tokens,chunk_columns",
                         [(37, 24, 203, 200, 10, 48), (16, 8, 64, 64, 16, 64)])  # fmt: skip
def test_fused_linear_cross_entropy(tokens, hidden, vocab, real_vocab, block_tokens, chunk_columns, dtype, backend):
    """The whole op (chunked, with ignore_index, a loss mask and vocabulary padding) against full logits."""
    gen = torch.Generator().manual_seed(tokens * vocab)
    h = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    target = torch.randint(0, real_vocab, (tokens,), generator=gen)
    target[1] = -100
    mask = (torch.rand(tokens, generator=gen) > 0.25).float()

    def fused(a, w):
        return fused_linear_cross_entropy(a, w, target, mask, vocab_size=real_vocab, block_tokens=block_tokens,
                                          chunk_columns=chunk_columns, backend=backend)  # fmt: skip

    def unfused(a, w):
        return ce_reference.linear_cross_entropy(a, w, target, mask, vocab_size=real_vocab)

    grad_out = torch.tensor(0.5)
    ref_loss, (ref_dh, ref_dw) = reference_grads(unfused, [h, weight], grad_out)
    loss, (dh, dw) = reference_grads(fused, [h, weight], grad_out)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(dh, ref_dh, dtype, "hidden gradient")
    assert_close(dw, ref_dw, dtype, "weight gradient")
