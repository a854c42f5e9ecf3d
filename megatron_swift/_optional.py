"""Optional extras (transformer-engine, apex, vllm, matplotlib), imported lazily with a one-line remedy."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> what to install
_EXTRAS = {
    "transformer_engine": "pip install 'megatron-swift[gpu]' (transformer-engine, needs CUDA)",
    "apex": "build NVIDIA apex from source (it is not the 'apex' package on PyPI)",
    "vllm": "pip install 'megatron-swift[serve]' (vllm, needs a CUDA GPU)",
    "matplotlib": "pip install 'megatron-swift[plot]' (matplotlib, for the plots), or pass --no-plots",
}


class MissingExtraError(ImportError):
    pass


def require(module: str) -> ModuleType:
    """Import an optional extra or raise a one-line error naming what to install."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a half-installed TE raises more than ImportError
        raise MissingExtraError(f"{module} is not usable ({type(exc).__name__}: {exc}); {_EXTRAS[module]}") from None


def has_transformer_engine() -> bool:
    try:
        require("transformer_engine")
    except MissingExtraError:
        return False
    return True


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (not installed, or no CUDA GPU), or None when it can."""
    import torch

    if not _installed("vllm"):
        return f"vllm is not installed; {_EXTRAS['vllm']}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False); vLLM serves on GPUs only"
    return None
