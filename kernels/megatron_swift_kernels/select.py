"""Which implementation of each kernel a run uses: `torch | triton | te | auto`, resolved once per run.

- `torch`: the pure-torch reference of each op (`<op>/reference.py`), autograd by torch.
- `triton`: the Triton kernels (`<op>/triton_impl.py`). They need a CUDA GPU, or
  `TRITON_INTERPRET=1` set before the kernels are first imported (Triton's CPU interpreter, used by
  the tests; far too slow for training). The interpreter choice is frozen when `triton.jit` decorates
  a kernel, so it is checked here rather than discovered as a wrong-device error mid-step.
- `te`: Transformer Engine, only for the ops it provides (`TE_OPS`); anything else is an error.
- `auto`: `triton` on CUDA when Triton is installed, else `torch`.

An unavailable choice raises `KernelUnavailableError` naming what to install or set. Nothing here
imports Triton or TE eagerly: a CPU-only install without them works with `torch`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

CHOICES = ("auto", "torch", "triton", "te")
OPS = ("rmsnorm", "swiglu", "rotary", "fused_linear_cross_entropy")
# Ops with a Transformer Engine implementation used through megatron-core's TE layer spec (TENorm).
TE_OPS = ("rmsnorm",)


class KernelUnavailableError(RuntimeError):
    pass


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton's CPU interpreter is on (read by `triton.jit` when our kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve(op: str, choice: str = "auto") -> str:
    """The implementation (`torch`, `triton` or `te`) that runs `op` for the configured `choice`."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if choice not in CHOICES:
        raise KernelUnavailableError(f"kernels={choice!r}: choose one of {', '.join(CHOICES)}")
    on_cuda = torch.cuda.is_available()
    if choice == "auto":
        return "triton" if on_cuda and triton_installed() else "torch"
    if choice == "triton":
        if not triton_installed():
            raise KernelUnavailableError("kernels=triton needs Triton: pip install 'megatron-swift[gpu]' (or triton)")
        if not on_cuda and not triton_interpreted():
            raise KernelUnavailableError(
                "kernels=triton needs a CUDA GPU; on CPU only Triton's interpreter runs it "
                "(export TRITON_INTERPRET=1 before starting, for testing), else choose torch or auto"
            )
        return "triton"
    if choice == "te":
        if op not in TE_OPS:
            raise KernelUnavailableError(
                f"kernels=te: Transformer Engine provides no {op} kernel here (only {', '.join(TE_OPS)}); "
                "choose triton, torch or auto"
            )
        if not (on_cuda and _te_installed()):
            raise KernelUnavailableError(
                "kernels=te needs a CUDA GPU and transformer-engine: pip install 'megatron-swift[gpu]'"
            )
        return "te"
    return "torch"
