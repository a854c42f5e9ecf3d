"""Megatron-core's fused kernels in training: which ones a run turns on, and what each one needs.

The `model` section names them as megatron-core does. `None` (the default) turns a fusion on when this
machine has what it needs and off otherwise; `true` on a machine without it is a preflight error naming
the field; `false` always wins. Conversion, evaluation and the CPU parity tests build their configs
without this module, so every fusion stays off there: the plain paths are exact.

- `apply_rope_fusion` (needs CUDA + Transformer Engine): rotary embedding, TE's fused RoPE (bshd and THD).
- `bias_dropout_fusion` (auto on CUDA): bias + dropout + residual add, megatron's jit fuser.
- `bias_activation_fusion` (auto on CUDA with the TE spec): SwiGLU, megatron's bias_swiglu. On the local
  spec our SwiGLU kernel (`model.kernels`) does this, so auto leaves it off there.
- `gradient_accumulation_fusion` (needs CUDA + Apex's fused_weight_gradient_mlp_cuda): the weight-gradient
  GEMM accumulates into the fp32 main_grad. Megatron's own output layer needs the Apex kernel even when
  the other linears are TE's.
- `cross_entropy_loss_fusion` (opt-in, as in megatron-core): vocab-parallel cross entropy, megatron's
  native jit version (bf16 runs only: it hands back bf16 gradients) or, with
  `cross_entropy_fusion_impl: te`, TE's (needs CUDA + TE).

The jit-fused ones compile with torch.compile; forced on a CPU they run, after a compile of tens of
seconds, which is why auto leaves them off there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_swift.training.config import ModelSection


@dataclass(frozen=True)
class Machine:
    """What the fusions depend on."""

    cuda: bool
    transformer_engine: bool
    apex_fused_wgrad: bool

    @classmethod
    def detect(cls) -> Machine:
        import importlib.util

        import torch

        from megatron_swift._optional import has_transformer_engine

        return cls(
            cuda=torch.cuda.is_available(),
            transformer_engine=has_transformer_engine(),
            apex_fused_wgrad=importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
        )


def _requirements(te_spec: bool, machine: Machine) -> dict[str, tuple[bool, bool, str]]:
    """field -> (would auto turn it on, can it run here, what it needs)."""
    te = machine.cuda and machine.transformer_engine
    return {
        "apply_rope_fusion": (te, te, "a CUDA GPU and transformer-engine (pip install '.[gpu]')"),
        "bias_dropout_fusion": (machine.cuda, True, ""),
        "bias_activation_fusion": (machine.cuda and te_spec, True, ""),
        "gradient_accumulation_fusion": (
            machine.cuda and machine.apex_fused_wgrad,
            machine.cuda and machine.apex_fused_wgrad,
            "a CUDA GPU and NVIDIA Apex built with --cpp_ext --cuda_ext (fused_weight_gradient_mlp_cuda)",
        ),
    }


def fusion_problems(model: ModelSection, te_spec: bool, machine: Machine, bf16: bool) -> list[str]:
    """Fusions forced on that this machine or configuration cannot run, each naming its field."""
    found = []
    for name, (_, runnable, needs) in _requirements(te_spec, machine).items():
        if getattr(model, name) is True and not runnable:
            found.append(f"model.{name}: needs {needs}; set it to null (auto) or false")
    if model.cross_entropy_loss_fusion:
        if model.cross_entropy_fusion_impl == "te" and not (machine.cuda and machine.transformer_engine):
            found.append("model.cross_entropy_fusion_impl=te: needs a CUDA GPU and transformer-engine; use native")
        if model.cross_entropy_fusion_impl == "native" and not bf16:
            # megatron-core's native version casts the logits gradient to bf16 whatever the precision
            # (fusions/fused_cross_entropy.py): measured 3e-3 off the fp32 gradient.
            found.append("model.cross_entropy_loss_fusion: megatron-core's native fused cross entropy returns "
                         "bf16 gradients; use it with train.bf16, or cross_entropy_fusion_impl: te")  # fmt: skip
        if model.fused_linear_cross_entropy:
            found.append("model.cross_entropy_loss_fusion and model.fused_linear_cross_entropy: choose one "
                         "(the fused linear loss never builds the logits the cross-entropy fusion reads)")  # fmt: skip
    return found


def resolve_fusions(model: ModelSection, te_spec: bool, machine: Machine) -> dict:
    """TransformerConfig fields for the fusions of this run (call after `fusion_problems` found none)."""
    resolved = {}
    for name, (auto, _, _) in _requirements(te_spec, machine).items():
        chosen = getattr(model, name)
        resolved[name] = auto if chosen is None else chosen
    resolved["cross_entropy_loss_fusion"] = model.cross_entropy_loss_fusion
    resolved["cross_entropy_fusion_impl"] = model.cross_entropy_fusion_impl
    return resolved
