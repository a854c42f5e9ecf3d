"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on q and k (qk-norm), explicit head_dim, optional bias."""

from megatron_swift.models.families.common import DENSE_DECODER, QK_NORM, TINY_DENSE
from megatron_swift.models.family import Family, register
from megatron_swift.models.mapping import RuleSet

QWEN3 = register(
    Family(
        name="qwen3",
        model_type="qwen3",
        architectures=("Qwen3ForCausalLM",),
        mapping=RuleSet(DENSE_DECODER.rules + QK_NORM, ignore_hf=DENSE_DECODER.ignore_hf),
        qk_layernorm=True,
        # head_dim * heads != hidden_size on purpose: real Qwen3 configs decouple them.
        tiny_config=dict(TINY_DENSE, head_dim=24, tie_word_embeddings=True),
    )
)
