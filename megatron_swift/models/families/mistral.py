"""Mistral (MistralForCausalLM): the Llama layout; v0.1 adds sliding-window attention."""

from megatron_swift.models.families.common import DENSE_DECODER, TINY_DENSE
from megatron_swift.models.family import Family, register

MISTRAL = register(
    Family(
        name="mistral",
        model_type="mistral",
        architectures=("MistralForCausalLM",),
        mapping=DENSE_DECODER,
        tiny_config=dict(TINY_DENSE, sliding_window=None, head_dim=16),
    )
)
