"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local layer spec.

megatron-core's local `DotProductAttention` materialises the [batch, heads, seq, seq] scores, masks
them in place and copies them around; on CPU that is most of the gap to HF transformers' training
step. It also supports neither packed sequences (THD) nor context parallelism: megatron-core leaves
both to Transformer Engine's attention. This module keeps megatron's interface and sizes (it
subclasses DotProductAttention) and computes the same attention with PyTorch's fused kernel, adding:

- packed sequences (`PackedSeqParams`, qkv_format "thd"): a block-diagonal causal mask built from
  `cu_seqlens`, so no token attends across a document boundary;
- context parallelism, the "all-gather" algorithm (TE's `cp_comm_type="all_gather"`): each CP rank
  holds two load-balanced sequence chunks (megatron's `get_batch_on_this_cp_rank` layout), gathers
  every rank's keys and values with megatron-core's sequence-parallel gather (whose backward
  reduce-scatters their gradients) and masks causally by global position.

- sliding windows (megatron's `window_size` = (left, 0) on the layers `window_attn_skip_freq` picks): keys more
  than `left` positions before the query are masked, by position within the document (THD) or in the whole
  sequence (CP).

- attention sinks (megatron's softmax_type "learnable", gpt-oss): a learned logit per head in every softmax's
  denominator. Computed as one extra key with a zero value whose score is the head's sink (a float mask column),
  so the probabilities are megatron's SoftmaxOne / HF's eager attention ones and the sink gets its gradient
  through the mask. The parameter is split over TP by heads and marked so (megatron-core's DotProductAttention
  leaves it unmarked, so the gradient norm would count only TP rank 0's sinks).

Cases it does not cover (attention bias, windows looking ahead, query-key layer scaling, explicit masks
under CP or THD) fall back to megatron's implementation, which raises for CP/THD. The Transformer
Engine spec is not affected: on GPUs CP and THD go through TE.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


def cp_positions(local_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global sequence positions of a CP rank's tokens: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    chunk = local_len // 2
    first = torch.arange(chunk, device=device)
    return torch.cat([first + cp_rank * chunk, first + (2 * cp_size - 1 - cp_rank) * chunk])


def packed_causal_keep(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where query i may attend key j: same document and j <= i."""
    index = torch.arange(total, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens[1:].to(index.dtype), index, right=True)
    return (document[:, None] == document[None, :]) & (index[:, None] >= index[None, :])


# Every layer of a forward asks for the same mask; these build each one once (masks are never mutated).
@functools.lru_cache(maxsize=8)
def _packed_keep_cached(offsets: tuple[int, ...], total: int, device: torch.device) -> torch.Tensor:
    return packed_causal_keep(torch.tensor(offsets, device=device), total)


@functools.lru_cache(maxsize=8)
def _cp_keep_cached(
    local_len: int, cp_rank: int, cp_size: int, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """[local, cp * local] bool: causal by global position, query chunks of `cp_rank` vs every rank's keys."""
    query_pos = cp_positions(local_len, cp_rank, cp_size, device)
    key_pos = torch.cat([cp_positions(local_len, r, cp_size, device) for r in range(cp_size)])
    return _window_keep(query_pos[:, None] >= key_pos[None, :], query_pos, key_pos, window)


def _window_keep(keep: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None):
    """`keep` without the keys more than `window` positions before the query (None: no window)."""
    return keep if window is None else keep & (query_pos[:, None] - key_pos[None, :] <= window)


@functools.lru_cache(maxsize=8)
def _window_causal_keep_cached(length: int, window: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(length, device=device)
    return _window_keep(index[:, None] >= index[None, :], index, index, window)


class SDPACoreAttention(DotProductAttention):
    def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        # Multi-latent attention passes its query/key and value head sizes (k_channels, v_channels), which
        # megatron-core 0.16's DotProductAttention does not take. SDPA reads them from the tensors; the output
        # width comes from config.kv_channels, which models/mla.py sets to the value head size.
        # DotProductAttention asserts context_parallel_size == 1 because it has no CP algorithm; this
        # class has one (forward), so the parent is built from a copy that says 1 and `self.config`
        # is the real one.
        parent_config = config
        if config.context_parallel_size > 1:
            parent_config = copy.copy(config)
            parent_config.context_parallel_size = 1
        super().__init__(parent_config, *args, **kwargs)
        self.config = config
        if self.softmax_offset is not None and isinstance(self.softmax_offset, torch.nn.Parameter):
            tensor_parallel.set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)
        # This layer's window: megatron's (left, right) when `window_attn_skip_freq` makes it a windowed layer.
        self.window_size = (
            tuple(config.window_size)
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number)
            else None
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):  # fmt: skip
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        packed = packed_seq_params is not None
        cp_size = self.config.context_parallel_size
        unsupported = (
            (packed and (packed_seq_params.qkv_format != "thd" or cp_size > 1))
            or ((packed or cp_size > 1) and (attention_mask is not None or mask_type != AttnMaskType.causal))
            or attention_bias is not None
            or kwargs
            or self.config.apply_query_key_layer_scaling
            or (self.window_size is not None and self.window_size[1] != 0)
            or mask_type not in (AttnMaskType.causal, AttnMaskType.padding, AttnMaskType.no_mask)
        )
        if unsupported:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)  # fmt: skip
        if packed:  # THD: [tokens, heads, d] with no batch dimension; one "batch" of all documents
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        seq_q, batch = query.shape[0], query.shape[1]
        window = None if self.window_size is None else self.window_size[0]
        keep = None
        if packed:
            keep = _packed_keep_cached(tuple(packed_seq_params.cu_seqlens_q.tolist()), seq_q, query.device)
            if window is not None:  # documents start where they start: the distance is the same in the pack
                keep = keep & _window_causal_keep_cached(seq_q, window, query.device)
        elif cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key, value = (
                tensor_parallel.gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True, group=group)
                for t in (key, value)
            )
            keep = _cp_keep_cached(seq_q, parallel_state.get_context_parallel_rank(), cp_size, query.device, window)
        elif attention_mask is not None:
            # megatron's masks are True where attention is NOT allowed; SDPA's boolean masks the opposite.
            keep = ~attention_mask
            if window is not None:
                index = torch.arange(seq_q, device=query.device)
                keep = _window_keep(keep, index, torch.arange(key.shape[0], device=query.device), window)
        elif window is not None and mask_type == AttnMaskType.causal:
            keep = _window_causal_keep_cached(seq_q, window, query.device)
        elif window is not None:
            raise ValueError(f"a sliding window needs causal attention, not {mask_type}")
        causal = keep is None and mask_type == AttnMaskType.causal
        sinks = self.softmax_offset if self.config.softmax_type == "learnable" else None
        if self.config.softmax_type == "off-by-one":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)  # fmt: skip
        # [s, b, heads, d] -> [b, heads, s, d] over [b, s, heads, d] memory (one copy each), the layout HF
        # hands SDPA: over megatron's [s, b] memory the CPU flash kernel strides b * heads * d between
        # positions (forward + backward measured 15% slower at 8 x 512 tokens). SDPA maps query heads onto
        # the k/v groups (GQA) itself.
        q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        value_dim = v.shape[-1]
        if value_dim < q.shape[-1]:
            # MLA: value heads narrower than query / key heads (DeepSeek-V3: 128 vs 192). SDPA's fused kernels
            # (CPU flash, GPU flash) take one head size; for two it falls back to its math path, which keeps
            # the [b, heads, s, s] probabilities in fp32 (measured on CPU: 4x the saved bytes at 2 x 256
            # tokens, 8 heads). Zero value columns give zero output columns, dropped below.
            v = F.pad(v, (0, q.shape[-1] - value_dim))
        if sinks is not None:
            q, k, v, keep = _with_sink_key(q, k, v, keep, causal, sinks)
            causal = False
        dropout = self.config.attention_dropout if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa
            )
        context = context[..., :value_dim].permute(2, 0, 1, 3).reshape(seq_q, batch, self.hidden_size_per_partition)
        return context.squeeze(1) if packed else context


def _with_sink_key(q, k, v, keep, causal: bool, sinks: torch.Tensor):
    """q, k, v and a float mask with one more key: zero key and value, score = the head's sink logit.

    `keep` ([.., sq, sk] bool, or None with `causal` or no mask) becomes 0 / -inf, with the sink column
    appended per head: [1 or b, heads, sq, sk + 1]. A zero key's raw score is 0, so the column's mask value is
    its score; the zero value adds nothing to the output, so what remains is HF's softmax over [scores, sink]
    with the sink's probability dropped."""
    seq_q, seq_k, heads = q.shape[2], k.shape[2], q.shape[1]
    if keep is None:
        keep = (
            torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
            if causal
            else torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
        )
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    scores_dtype = torch.promote_types(q.dtype, sinks.dtype)
    bias = torch.zeros(keep.shape, dtype=scores_dtype, device=q.device).masked_fill(~keep, float("-inf"))
    bias = bias.expand(keep.shape[0], heads, seq_q, seq_k)
    sink_column = sinks.to(scores_dtype).reshape(1, heads, 1, 1).expand(keep.shape[0], heads, seq_q, 1)
    mask = torch.cat([bias, sink_column], dim=-1).to(q.dtype)
    k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[3])], dim=2) for t in (k, v))
    return q, k, v, mask


def use_sdpa_core_attention(block_spec) -> None:
    """Point every self-attention of a local-spec decoder block at SDPACoreAttention."""
    for layer_spec in block_spec.layer_specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is not None and getattr(submodules, "core_attention", None) is DotProductAttention:
            submodules.core_attention = SDPACoreAttention
