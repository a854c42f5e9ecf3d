"""Model knowledge: HF config translation, per-family parameter mappings (data), GPTModel building."""

from megatron_swift.models.builder import build_model_chunks, transformer_config
from megatron_swift.models.family import (
    Family,
    UnsupportedModelError,
    all_families,
    family_for,
    supported_architectures,
)
from megatron_swift.models.hf_config import GPTModelArgs, dtype_from_name, translate

__all__ = [
    "Family",
    "GPTModelArgs",
    "UnsupportedModelError",
    "all_families",
    "build_model_chunks",
    "dtype_from_name",
    "family_for",
    "supported_architectures",
    "transformer_config",
    "translate",
]
