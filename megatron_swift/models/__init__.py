"""Model knowledge: HF config translation, per-family parameter mappings (data), GPTModel building."""

from megatron_swift.models.builder import build_model_chunks, transformer_config
from megatron_swift.models.family import Family, UnsupportedModelError, families, family_for, supported_architectures
from megatron_swift.models.hf_config import GPTModelArgs, dtype_from_name, translate

__all__ = [
    "Family",
    "GPTModelArgs",
    "UnsupportedModelError",
    "build_model_chunks",
    "dtype_from_name",
    "families",
    "family_for",
    "supported_architectures",
    "transformer_config",
    "translate",
]
