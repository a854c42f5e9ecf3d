"""LoRA on megatron-core parallel linears: config, layers, targeting, merge."""

from megatron_swift.tuners.lora.apply import LoraReport, apply_lora, trainable_state_keys
from megatron_swift.tuners.lora.config import LoraConfig
from megatron_swift.tuners.lora.layers import LoraLinear, adapters_disabled
from megatron_swift.tuners.lora.merge import merge_lora, merged_weight, unmerged_weight

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "LoraReport",
    "adapters_disabled",
    "apply_lora",
    "merge_lora",
    "merged_weight",
    "trainable_state_keys",
    "unmerged_weight",
]
