"""Rotary apply forward and backward in Triton over [tokens, heads, d] with one position per token.

Both layouts reduce to this: [s, b, h, d] is s * b tokens whose position is their s index; packed THD
tokens carry their position inside their document. One program per token rotates all its heads (the
cos/sin row is loaded once). The backward is the same rotation by the transposed matrix:
forward  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
backward g1 = d1 c1 + d2 s2,   g2 = d2 c2 - d1 s1
Channels past rot_dim pass through unchanged (their gradient too). Arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary(X, COS, SIN, POS, Y, n_heads, head_dim, rot_dim,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
            BACKWARD: tl.constexpr):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(POS + token).to(tl.int64)
    half = rot_dim // 2
    heads = tl.arange(0, BLOCK_H)[:, None]
    channels = tl.arange(0, BLOCK_HALF)[None, :]
    table_mask = channels < half
    mask = (heads < n_heads) & table_mask
    x_row = X + token * n_heads * head_dim + heads * head_dim
    y_row = Y + token * n_heads * head_dim + heads * head_dim
    x1 = tl.load(x_row + channels, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + channels, mask=mask, other=0.0).to(tl.float32)
    table = position * rot_dim + channels
    c1 = tl.load(COS + table, mask=table_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + half, mask=table_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table, mask=table_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + half, mask=table_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_row + channels, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + half + channels, y2.to(Y.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        rest = tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = (heads < n_heads) & (rest < head_dim - rot_dim)
        tl.store(y_row + rot_dim + rest, tl.load(x_row + rot_dim + rest, mask=pass_mask), mask=pass_mask)


def rotary_apply(x, cos, sin, positions, *, backward: bool = False, out=None) -> torch.Tensor:
    """x: contiguous [tokens, heads, d]; cos/sin: contiguous [positions, rot_dim]; positions: [tokens] int."""
    tokens, n_heads, head_dim = x.shape
    rot_dim = cos.shape[-1]
    if rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"rotary: rot_dim {rot_dim} must be even and <= head dim {head_dim}")
    out = torch.empty_like(x) if out is None else out
    pass_dim = head_dim - rot_dim
    _rotary[(tokens,)](
        x, cos, sin, positions, out, n_heads, head_dim, rot_dim,
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_HALF=triton.next_power_of_2(rot_dim // 2),
        BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim else 0, BACKWARD=backward,
    )  # fmt: skip
    return out
