"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local layer spec.

megatron-core's local `DotProductAttention` materialises the [batch, heads, seq, seq] scores, masks
them in place and copies them around; on CPU that is most of the gap to HF transformers' training
step. This module keeps megatron's interface and sizes (it subclasses DotProductAttention) and
computes the same attention with PyTorch's fused kernel. Cases it does not cover (packed sequences,
attention bias, sliding windows, query-key layer scaling) fall back to megatron's implementation.
The Transformer Engine spec is not affected.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):  # fmt: skip
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        unsupported = (
            packed_seq_params is not None
            or attention_bias is not None
            or kwargs
            or self.config.apply_query_key_layer_scaling
            or self.config.window_size is not None
            or mask_type not in (AttnMaskType.causal, AttnMaskType.padding, AttnMaskType.no_mask)
        )
        if unsupported:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)  # fmt: skip
        seq_q, batch = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]; SDPA maps query heads onto the k/v groups (GQA) itself.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # megatron's masks are True where attention is NOT allowed; SDPA's boolean masks the opposite.
        keep = None if causal or attention_mask is None else ~attention_mask
        dropout = self.config.attention_dropout if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa
            )
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, self.hidden_size_per_partition)


def use_sdpa_core_attention(block_spec) -> None:
    """Point every self-attention of a local-spec decoder block at SDPACoreAttention."""
    for layer_spec in block_spec.layer_specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is not None and getattr(submodules, "core_attention", None) is DotProductAttention:
            submodules.core_attention = SDPACoreAttention
