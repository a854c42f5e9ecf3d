"""Decoder-layer pieces megatron-core 0.16's layer specs have no slot for, as spec modules (Gemma 2 / 3 style).

- `ZeroCenteredRMSNorm`: RMSNorm scaling by (1 + weight), the weight stored zero-centred (HF Gemma's norms,
  megatron's `layernorm_zero_centered_gamma`, which its torch norm refuses without Apex / TE). Computed in
  fp32 and cast back, as HF's Gemma3RMSNorm, so bf16 runs round where HF rounds.
- `OutputNormSelfAttention` / `OutputNormMLP`: megatron's SelfAttention and MLP with a norm on their output,
  before the residual add (Gemma's post-attention and post-feedforward norms). The norm sits after
  `linear_proj` / `linear_fc2` (and after any LoRA adapter on them), on the tokens this rank holds.
- Sliding-window layers with their own rope base (Gemma 3's `rope_local_base_freq`): GPTModel makes one rotary
  table for every layer; a windowed layer's attention swaps it for its own table of the same length and layout.

- Biased routed experts on the local spec (gpt-oss): megatron-core's MLP adds an expert's `linear_fc2` bias in
  place (`output += bias * probs`), and its RowParallelLinear returns, at expert-TP 1, the output of an autograd
  Function that handed its input back: autograd forbids that in-place add ("a view ... modified inplace"). The
  experts' `linear_fc2` here returns a copy when it has a bias, so the add is legal and the same computation.

Parameters keep megatron's tags: a norm's weight is marked `sequence_parallel` under sequence parallelism, so
`finalize_model_grads` sums its gradient over TP (each rank saw other tokens), and q/k norms keep their names
(`q_layernorm`, `k_layernorm`), whose gradients megatron-core sums over TP by name.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import is_layer_window_attention


class ZeroCenteredRMSNorm(MegatronModule):  # MegatronModule: its sharded_state_dict (replicated over TP)
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config)
        self.eps = eps
        # Zero-centred: a fresh norm is the identity scale, as HF initialises Gemma's.
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).type_as(hidden_states)


def _output_norm(config, norm):
    return None if norm is None else norm(config, config.hidden_size, eps=config.layernorm_epsilon)


def _normed(output_with_bias, norm):
    output, bias = output_with_bias
    if norm is None:
        return output, bias
    if bias is not None:  # the norm applies to the biased output; megatron would add the bias after
        output, bias = output + bias, None
    return norm(output), bias


class OutputNormSelfAttention(SelfAttention):
    """SelfAttention with an optional output norm and, on sliding-window layers, an optional own rope base."""

    def __init__(self, config, submodules, layer_number, *args, output_norm=None, window_rotary_base=None, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.output_layernorm = _output_norm(config, output_norm)
        self.window_rotary = None
        if window_rotary_base is not None and is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, self.layer_number
        ):
            self.window_rotary = RotaryEmbedding(
                config.kv_channels,
                rotary_percent=1.0,
                rotary_base=window_rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
            )

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if self.window_rotary is not None and rotary_pos_emb is not None:
            # GPTModel's table holds this rank's positions: the whole (packed: longest) sequence, or under context
            # parallelism without packing this rank's 2 of 2 * cp chunks, which RotaryEmbedding cuts the same way.
            packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            cp = 1 if packed else parallel_state.get_context_parallel_world_size()
            rotary_pos_emb = self.window_rotary(rotary_pos_emb.shape[0] * cp, packed_seq=packed)
        output = super().forward(
            hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
            **kwargs,
        )  # fmt: skip
        return _normed(output, self.output_layernorm)


class OutputNormMLP(MLP):
    def __init__(self, config, submodules, *args, output_norm=None, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.output_layernorm = _output_norm(config, output_norm)

    def forward(self, hidden_states, *args, **kwargs):
        return _normed(super().forward(hidden_states, *args, **kwargs), self.output_layernorm)


def _is_norm_slot(module) -> bool:
    return module is not None and module is not IdentityOp


def use_layer_variants(block_spec, *, zero_centered_norms: bool, output_norms: bool, window_rotary_base, te: bool):
    """Rewrite a decoder block spec in place: (1 + w) norms (the local spec's norm slots; the Transformer Engine
    spec's fused norms follow `layernorm_zero_centered_gamma` themselves), output norms on attention and dense
    MLP, and the sliding-window layers' rope base."""
    norm = ZeroCenteredRMSNorm if zero_centered_norms else None
    if output_norms and norm is None:
        raise ValueError("output norms are built as (1 + w) RMSNorms (Gemma's) only")
    for layer_spec in block_spec.layer_specs:
        layer = layer_spec.submodules
        if norm is not None and not te:
            for name in ("input_layernorm", "pre_mlp_layernorm"):
                if _is_norm_slot(getattr(layer, name)):
                    setattr(layer, name, norm)
            attention = layer.self_attention.submodules
            for name in ("q_layernorm", "k_layernorm"):
                if _is_norm_slot(getattr(attention, name, None)):
                    setattr(attention, name, norm)
        if output_norms or window_rotary_base is not None:
            attention = layer.self_attention
            if attention.module is OutputNormSelfAttention:  # layers of a block may share one spec
                continue
            if attention.module is not SelfAttention:
                raise ValueError(f"output norms / window rope need megatron's SelfAttention, not {attention.module}")
            output_norm = norm if output_norms else None
            layer.self_attention = dataclasses.replace(
                attention,
                module=OutputNormSelfAttention,
                params={**attention.params, "output_norm": output_norm, "window_rotary_base": window_rotary_base},
            )
        if output_norms:
            mlp = layer.mlp
            if not (isinstance(mlp, ModuleSpec) and mlp.module is MLP):
                raise ValueError("output norms are built for dense MLP layers only")
            layer.mlp = dataclasses.replace(mlp, module=OutputNormMLP, params={**mlp.params, "output_norm": norm})
    if norm is not None and not te:
        block_spec.layer_norm = norm


class BiasedExpertRowParallelLinear(RowParallelLinear):
    """An expert's linear_fc2 whose output megatron-core's MLP may add the bias to in place (see the module
    docstring)."""

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return (output.clone() if bias is not None else output), bias


def use_biased_expert_outputs(block_spec) -> None:
    """Point the local spec's routed experts' linear_fc2 at BiasedExpertRowParallelLinear."""
    for layer_spec in block_spec.layer_specs:
        experts = getattr(getattr(layer_spec.submodules.mlp, "submodules", None), "experts", None)
        submodules = getattr(experts, "submodules", None)
        if submodules is not None and getattr(submodules, "linear_fc2", None) is RowParallelLinear:
            submodules.linear_fc2 = BiasedExpertRowParallelLinear
