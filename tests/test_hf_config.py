"""HF config -> megatron-core arguments, checked against transformers as the reference."""

import pytest
import torch

from megatron_swift.config import ConfigError
from megatron_swift.models import UnsupportedModelError, all_families, translate
from megatron_swift.models.tiny import tiny_hf_config


def test_every_family_translates_its_tiny_config():
    for name, family in all_families().items():
        top = tiny_hf_config(family)
        hf = top.get_text_config()  # a vision-language config's decoder is its text config
        args = translate(top)
        t = args.transformer
        assert args.family is family
        assert t["num_layers"] == hf.num_hidden_layers and t["hidden_size"] == hf.hidden_size
        assert t["num_query_groups"] == hf.num_key_value_heads
        if family.attention == "mla":  # kv_channels sizes the attention output: the value heads
            assert t["kv_channels"] == hf.v_head_dim and t["qk_layernorm"] and t["multi_latent_attention"]
        else:
            assert t["kv_channels"] == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
            # GLM-4.5: use_qk_norm
            assert t["qk_layernorm"] == (name.startswith("qwen3") or name in ("glm4_moe", "gemma3"))
        assert args.share_embeddings_and_output_weights == top.tie_word_embeddings
        assert args.padded_vocab_size % 128 == 0 and args.padded_vocab_size >= hf.vocab_size


def test_qwen2_has_qkv_bias_and_o_proj_bias_is_refused():
    assert translate(tiny_hf_config(all_families()["qwen2"])).transformer["add_qkv_bias"] is True
    # GLM-4.5's attention_bias biases q/k/v only (its o_proj has none); use_qk_norm switches qk-norm.
    glm = all_families()["glm4_moe"]
    assert translate(tiny_hf_config(glm)).transformer["add_qkv_bias"] is True
    plain = translate(tiny_hf_config(glm, attention_bias=False, use_qk_norm=False)).transformer
    assert plain["add_qkv_bias"] is False and plain["qk_layernorm"] is False
    assert translate(tiny_hf_config(glm, partial_rotary_factor=0.25)).rotary_percent == 0.25
    assert translate(tiny_hf_config(all_families()["llama"])).transformer["add_qkv_bias"] is False
    with pytest.raises(ConfigError, match="attention_bias=true"):
        translate(tiny_hf_config(all_families()["qwen3"], attention_bias=True))


def test_moe_fields():
    mixtral = translate(tiny_hf_config(all_families()["mixtral"])).transformer
    assert (mixtral["num_moe_experts"], mixtral["moe_router_topk"], mixtral["moe_ffn_hidden_size"]) == (4, 2, 96)
    assert mixtral["moe_router_pre_softmax"] is False  # renormalised top-k
    assert "moe_layer_freq" not in mixtral
    qwen = translate(tiny_hf_config(all_families()["qwen3_moe"], norm_topk_prob=False)).transformer
    assert qwen["moe_router_pre_softmax"] is True
    assert qwen["moe_layer_freq"] == [0, 1, 1, 1]  # mlp_only_layers=[0]
    assert qwen["moe_ffn_hidden_size"] == 48 and qwen["ffn_hidden_size"] == 160


def test_shared_expert_fields():
    qwen2_moe = translate(tiny_hf_config(all_families()["qwen2_moe"])).transformer
    assert qwen2_moe["moe_shared_expert_intermediate_size"] == 80 and qwen2_moe["moe_shared_expert_gate"] is True
    assert qwen2_moe["add_qkv_bias"] is True and qwen2_moe["moe_router_pre_softmax"] is True


def test_llama3_rope_scaling_matches_transformers_inv_freq():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_hf_config(all_families()["llama"])
    args = translate(hf)
    assert args.rope_scaling and args.rope_scaling_factor == 8.0
    ours = RotaryEmbedding(
        kv_channels=args.transformer["kv_channels"],
        rotary_percent=1.0,
        rotary_base=args.rotary_base,
        rope_scaling=True,
        rope_scaling_factor=args.rope_scaling_factor,
        use_cpu_initialization=True,
    ).inv_freq
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    unscaled = 1.0 / (args.rotary_base ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.allclose(reference, unscaled)  # the test config really exercises the scaling
    torch.testing.assert_close(ours, reference.float(), rtol=1e-6, atol=0)


def test_linear_rope_and_unsupported_rope():
    family = all_families()["qwen2"]
    linear = translate(
        tiny_hf_config(family, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    )
    assert linear.seq_len_interpolation_factor == 4.0
    with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
        translate(
            tiny_hf_config(
                family,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 1e4,
                    "original_max_position_embeddings": 64,
                },
            )
        )
    with pytest.raises(ConfigError, match=r"low_freq_factor=2\.0 is not supported"):
        translate(
            tiny_hf_config(
                all_families()["llama"],
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_theta": 5e5,
                },
            )
        )


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(
        UnsupportedModelError,
        match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "
        r"DeepseekV3ForCausalLM, Gemma3ForCausalLM, Glm4MoeForCausalLM, GptOssForCausalLM, LlamaForCausalLM, "
        r"MistralForCausalLM",
    ):
        translate(GPT2Config(architectures=["GPT2LMHeadModel"]))
