"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): a Llama-shaped decoder with q/k/v biases; small sizes tie embeddings."""

from megatron_swift.models.families.common import DENSE_DECODER, TINY_DENSE
from megatron_swift.models.family import Family, register

QWEN2 = register(
    Family(
        name="qwen2",
        model_type="qwen2",
        architectures=("Qwen2ForCausalLM",),
        mapping=DENSE_DECODER,
        qkv_bias=True,
        tiny_config=dict(
            TINY_DENSE, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)
        ),
    )
)
