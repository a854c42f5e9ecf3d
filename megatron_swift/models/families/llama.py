"""Llama 2 / 3 / 3.1 / 3.2 (LlamaForCausalLM)."""

from megatron_swift.models.families.common import DENSE_DECODER, TINY_DENSE
from megatron_swift.models.family import Family, register

LLAMA = register(
    Family(
        name="llama",
        model_type="llama",
        architectures=("LlamaForCausalLM",),
        mapping=DENSE_DECODER,
        # Llama 3.1 rope scaling; original_max_position_embeddings <= max_position_embeddings as in the real configs.
        tiny_config=dict(
            TINY_DENSE,
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    )
)
