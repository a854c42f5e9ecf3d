"""LoRA options, with the names PEFT and ms-swift users know."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # DoRA (PEFT's use_dora): a trained magnitude per output feature rescales W + scale * B A (tuners/lora/layers.py).
    use_dora: bool = False
    # Short megatron names (the family's `lora_linears`: linear_qkv, linear_proj, linear_fc1, linear_fc2 on a
    # standard decoder), HF names (q_proj, ..., mapped
    # through the family table), `all-linear`, or regular expressions over module paths (`re:...`).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Trained in full and saved with the adapter: `embedding`, `output_layer`, `router`, or module paths.
    modules_to_save: list[str] = field(default_factory=list)
    # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to continue training from.
    adapter: str | None = None
    # Initialisation of lora_B: zero (the adapter starts as a no-op, as in PEFT) unless a test asks otherwise.
    init_b_zero: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def problems(self) -> list[str]:
        found = []
        if self.rank < 1:
            found.append(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            found.append("lora.target_modules is empty: name at least one module (or all-linear)")
        if "all-router" in self.target_modules:
            found.append("lora.target_modules: all-router is not supported; train the router fully with "
                         "lora.modules_to_save: [router]")  # fmt: skip
        return found
