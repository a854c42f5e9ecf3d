"""Rotary position embedding apply in pure torch (reference and `torch` backend), megatron-core's convention.

As megatron-core's `_apply_rotary_pos_emb_bshd` (models/common/embeddings/rope_utils.py), non-interleaved:
`freqs` is [s, 1, 1, rot_dim] (the two halves of the last dimension are the frequencies of the two halves
of each head); cos/sin are computed in fp32, scaled by `mscale` and cast to the input dtype; the first
`rot_dim` channels become t * cos + rotate_half(t) * sin with rotate_half(t) = [-t2, t1], the rest pass.

Packed THD ([tokens, heads, dim] with `cu_seqlens` document offsets): positions restart at 0 for every
document, as megatron's `_apply_rotary_pos_emb_thd` does when `freqs` covers the longest document (not
every token; megatron switches to offset positions when freqs.size(0) == total tokens).
"""

from __future__ import annotations

import torch


def rotary_tables(freqs: torch.Tensor, dtype: torch.dtype, mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, rot_dim] in `dtype`, from megatron's [positions, 1, 1, rot_dim] freqs."""
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"rotary: freqs must be [positions, 1, 1, rot_dim], got {tuple(freqs.shape)}")
    flat = freqs.reshape(freqs.shape[0], freqs.shape[-1]).float()
    return (torch.cos(flat) * mscale).to(dtype), (torch.sin(flat) * mscale).to(dtype)


def thd_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its own document: [total] int64."""
    index = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens.to(index.dtype)
    document = torch.searchsorted(starts[1:], index, right=True)
    return index - starts[document]


def _apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [..., d]; cos/sin broadcastable to [..., rot_dim]."""
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    first, second = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """t: [s, b, heads, d]; freqs: [>= s, 1, 1, rot_dim]."""
    cos, sin = rotary_tables(freqs[: t.shape[0]], t.dtype, mscale)
    return _apply(t, cos[:, None, None, :], sin[:, None, None, :])


def apply_rotary_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0):
    """t: [tokens, heads, d] packed documents; freqs: [>= longest document, 1, 1, rot_dim]."""
    cos, sin = rotary_tables(freqs, t.dtype, mscale)
    positions = thd_positions(cu_seqlens, t.shape[0])
    return _apply(t, cos[positions][:, None, :], sin[positions][:, None, :])
