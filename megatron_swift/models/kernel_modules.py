"""Our kernels (kernels/) inside megatron-core models: layer-spec modules and the fused-loss model hook.

`model.kernels` (torch | triton | te | auto, see megatron_swift_kernels/select.py) chooses an implementation per op;
this module turns the choice into modules, never by patching megatron-core:

- `KernelRMSNorm`: megatron's norm signature `(config, hidden_size, eps)`, placed in the local spec
  wherever megatron would put its torch (or Apex) norm: input/pre-MLP norms, q/k norms, the final norm.
  Its weight carries `sequence_parallel = config.sequence_parallel`: under sequence parallelism each TP
  rank sees a different slice of the tokens, and `finalize_model_grads` all-reduces the gradients of
  parameters tagged so over TP (the CPU shim for megatron's WrappedTorchNorm is not involved then).
- `KernelMLP`: megatron's MLP with silu(gate) * up computed by our SwiGLU op on the fused fc1 output.
- `FusedLossGPTModel`: in training, the last stage returns the output layer's *input* (after the same
  tensor-parallel input region the output layer applies: sequence-parallel all-gather, or the
  copy whose backward all-reduces) instead of logits; training/step.py then computes the loss with
  the fused linear + cross-entropy op from these hidden states and `output_weight()`. GPTModel makes
  logits in exactly one place, `_postprocess`; the override returns early only in that case (training,
  no labels, no MTP, no inference) and otherwise defers to megatron-core.

Only module classes change, never parameters, so state-dict keys are the same for every choice.
Rotary embedding stays megatron-core's: its attention calls the rotary function directly, so using
ours would mean replacing the attention forward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_swift.config import ConfigError
from megatron_swift.models.gpt import GPTModel
from megatron_swift_kernels.select import KernelUnavailableError, resolve


def kernel_backends(kernels: str, te_spec: bool, fused_loss: bool) -> dict[str, str]:
    """op -> implementation for this run; ConfigError for a choice this machine or spec cannot run."""
    if te_spec and kernels not in ("auto", "te"):
        raise ConfigError(
            f"model.kernels={kernels}: the Transformer Engine layer spec fuses its norms into its linears; "
            "choose model.kernels auto or te, or model.spec=local"
        )
    if not te_spec and kernels == "te":
        raise ConfigError("model.kernels=te comes with the Transformer Engine layer spec: set model.spec=te")
    ops = [] if te_spec else ["rmsnorm", "swiglu"]
    ops += ["fused_linear_cross_entropy"] if fused_loss else []
    try:
        return {op: resolve(op, kernels) for op in ops}
    except KernelUnavailableError as exc:
        raise ConfigError(f"model.kernels: {exc}") from None


class KernelRMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, backend: str = "torch", **_unused):
        super().__init__()
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("KernelRMSNorm implements RMSNorm without zero-centred gamma")
        self.eps, self.backend = eps, backend
        # Same creation as megatron's torch norm (fp32 on the default device; Float16Module casts later).
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from megatron_swift_kernels.rmsnorm import rms_norm

        return rms_norm(hidden_states, self.weight, self.eps, self.backend)


class KernelMLP(MLP):
    def __init__(self, config, submodules, *args, swiglu_backend: str = "torch", **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.swiglu_backend = swiglu_backend
        # Exactly megatron's unfused `silu(gate) * up` branch; anything else keeps megatron's forward.
        self.uses_swiglu = (
            config.gated_linear_unit
            and config.activation_func is F.silu
            and not config.use_te_activation_func
            and not config.bias_activation_fusion
            and config.activation_func_clamp_value is None
            and config.glu_linear_offset == 0
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.uses_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        from megatron_swift_kernels.swiglu import swiglu

        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate, self.swiglu_backend))


def _is_megatron_norm(module) -> bool:
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    target = module.module if isinstance(module, ModuleSpec) else module
    return target in (WrappedTorchNorm, FusedLayerNorm)


def use_kernel_modules(block_spec, backends: dict[str, str]) -> None:
    """Point a local-spec decoder block's norms and dense MLPs at our modules (in place)."""
    norm = ModuleSpec(module=KernelRMSNorm, params={"backend": backends["rmsnorm"]})
    for layer_spec in block_spec.layer_specs:
        layer = layer_spec.submodules
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if _is_megatron_norm(getattr(layer, name)):
                setattr(layer, name, norm)
        attention = getattr(getattr(layer, "self_attention", None), "submodules", None)
        for name in ("q_layernorm", "k_layernorm"):
            if attention is not None and _is_megatron_norm(getattr(attention, name, None)):
                setattr(attention, name, norm)
        mlp = layer.mlp
        if isinstance(mlp, ModuleSpec) and mlp.module is MLP:  # MoE layers keep megatron's experts
            layer.mlp = dataclasses.replace(
                mlp, module=KernelMLP, params={**mlp.params, "swiglu_backend": backends["swiglu"]}
            )
    if _is_megatron_norm(block_spec.layer_norm):
        block_spec.layer_norm = norm


class FusedLossGPTModel(GPTModel):
    def __init__(self, *args, loss_backend: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_backend = loss_backend

    def returns_hidden_states(self) -> bool:
        """In this mode the last stage's output is the output layer's input, [b, s, h]."""
        return self.post_process and self.training and not self.mtp_process

    def output_weight(self) -> torch.Tensor:
        """The output projection's weight, as `_postprocess` picks it (tied to the embedding or not)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _postprocess(self, hidden_states, **kwargs):
        if not self.returns_hidden_states() or kwargs.get("labels") is not None or kwargs.get("inference_context"):
            return super()._postprocess(hidden_states, **kwargs)
        from megatron.core import tensor_parallel

        layer = self.output_layer
        if type(layer) is not tensor_parallel.ColumnParallelLinear:
            raise ConfigError(
                f"model.fused_linear_cross_entropy: the output layer is a {type(layer).__name__} (an adapter?); "
                "the fused loss uses its plain weight only. Turn the fused loss off for this run."
            )
        if layer.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=layer.tp_group
            )
        else:
            hidden_states = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=layer.tp_group)
        return hidden_states.transpose(0, 1).contiguous()
