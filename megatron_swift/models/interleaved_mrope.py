"""Interleaved multimodal rope (Qwen3-VL): the rotary frequencies of a head's channels taken from the temporal, height
and width positions in turn, as HF's `Qwen3VLTextRotaryEmbedding` lays them out.

megatron-core's `MultimodalRotaryEmbedding` (Qwen2-VL / Qwen2.5-VL) gives the first `mrope_section[0]` frequency
channels the temporal position, the next `mrope_section[1]` the height's and the last the width's (chunked). Qwen3-VL
interleaves them: channel i (of head_dim / 2) takes the height position when i = 1 mod 3 and i < 3 *
mrope_section[1], the width position when i = 2 mod 3 and i < 3 * mrope_section[2], the temporal position otherwise.
Only the frequencies differ: the result, [s, b, 1, head_dim] as megatron-core's module returns it (the halves
repeated: HF's rotate_half layout), goes through megatron-core's own apply path unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def interleaved_sections_problem(mrope_section) -> str | None:
    """Why `mrope_section` cannot be interleaved over its head_dim / 2 = sum(sections) channels, or None."""
    channels = sum(mrope_section)
    if len(mrope_section) != 3 or 3 * max(mrope_section[1], mrope_section[2]) > channels:
        return (
            f"rope_parameters.mrope_section={list(mrope_section)}: interleaved multimodal rope needs three sections "
            f"with 3 x the height / width sections at most head_dim / 2 = {channels}"
        )
    return None


def interleave(freqs: torch.Tensor, mrope_section) -> torch.Tensor:
    """freqs [3, ..., head_dim / 2] (one row per axis: t, h, w) -> [..., head_dim / 2], the axes interleaved."""
    mixed = freqs[0].clone()
    for axis in (1, 2):  # height channels 1, 4, 7, ...; width channels 2, 5, 8, ...
        channels = slice(axis, 3 * mrope_section[axis], 3)
        mixed[..., channels] = freqs[axis][..., channels]
    return mixed


class InterleavedMultimodalRotaryEmbedding(nn.Module):
    """Stands in for GPTModel's `rotary_pos_emb` (a `MultimodalRotaryEmbedding`), keeping its inverse frequencies,
    interpolation factor and context-parallel group; `forward(position_ids [3, b, s], mrope_section)` as it."""

    def __init__(self, chunked: nn.Module):
        super().__init__()
        if chunked.rotary_interleaved:  # megatron's pairwise channel layout; HF's is rotate_half
            raise ValueError("interleaved multimodal rope is HF's rotate_half layout: rotary_interleaved must be off")
        self.inv_freq = chunked.inv_freq
        self.seq_len_interpolation_factor = chunked.seq_len_interpolation_factor
        self.cp_group = chunked.cp_group

    def forward(self, position_ids: torch.Tensor, mrope_section, cp_group=None) -> torch.Tensor:
        from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

        positions = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            positions = positions * (1 / self.seq_len_interpolation_factor)
        freqs = positions[..., None] * self.inv_freq  # [3, b, s, head_dim / 2], each axis's position
        mixed = interleave(freqs, mrope_section)
        emb = torch.cat((mixed, mixed), dim=-1)  # [b, s, head_dim]
        emb = emb[..., None, :].transpose(0, 1).contiguous()  # [s, b, 1, head_dim]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb
