"""DeepSeek-V3 (MLA + sigmoid-routed MoE with an expert bias) against HF transformers' DeepseekV3 as the reference.

The tiny model also runs through every family-wide test (round trip, logits at TP1 / TP2 / PP2 / EP2). Here: the
variant without q_lora_rank, the refusals, step-1 loss and gradient vs HF, training parity across layouts, the
expert-bias update against megatron-core's rule on HF's own routing, its checkpoint / resume / export, and LoRA.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.check import check
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.models import all_families, translate
from megatron_swift.models.layout import model_layout_problems
from megatron_swift.models.tiny import make_tiny_model, tiny_hf_config
from tests.test_roundtrip import assert_bit_exact

DATA = "examples/data/sft_sample.jsonl"
FAMILY = "deepseek_v3"


def _config(**overrides):
    return tiny_hf_config(all_families()[FAMILY], **overrides)


def test_without_q_lora_rank_round_trip_and_logits(tmp_path):
    source = make_tiny_model(FAMILY, tmp_path / "hf", seed=11, q_lora_rank=None)
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(source / "model.safetensors")
    mcore = hf_to_mcore(source, tmp_path / "mcore")
    assert_bit_exact(source, mcore_to_hf(mcore, tmp_path / "out"))
    result = check(source, mcore)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_mtp_layers_in_the_checkpoint_are_refused_not_dropped(tiny_models, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    for file in tiny_models[FAMILY].iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)  # DeepSeek-V3's MTP module at layer 61
    tensors["model.layers.4.self_attn.o_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers \[4\] beyond num_hidden_layers=4 \(multi-token-prediction"):
        hf_to_mcore(source, tmp_path / "mcore")
    assert not (tmp_path / "mcore").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
        ({"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false is not supported with sigmoid routing"),
        ({"topk_group": 1}, "num_experts_per_tok=4 with topk_group=1"),
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for deepseek_v3"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear' is not supported for deepseek_v3"),
    ],
)
def test_what_megatron_cannot_express_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        translate(_config(**overrides))


def test_layout_refuses_latent_ranks_tp_cannot_split():
    args = translate(_config(q_lora_rank=18))
    problems = model_layout_problems(args, ParallelConfig(tensor_model_parallel_size=4))
    assert "q_lora_rank=18 is not divisible by tensor parallel 4" in problems


def test_router_and_attention_translation():
    t = translate(_config()).transformer
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"]
    assert (t["moe_router_num_groups"], t["moe_router_group_topk"], t["moe_router_topk_scaling_factor"]) == (4, 2, 2.5)
    assert t["moe_layer_freq"] == [0, 1, 1, 1] and t["moe_shared_expert_intermediate_size"] == 32
    assert t["moe_router_load_balancing_type"] == "seq_aux_loss" and t["moe_aux_loss_coeff"] == 0.001
    assert (t["rope_type"], t["rotary_scaling_factor"], t["original_max_position_embeddings"]) == ("yarn", 40.0, 4096)
    assert (t["q_lora_rank"], t["kv_lora_rank"], t["qk_head_dim"], t["qk_pos_emb_head_dim"]) == (32, 16, 16, 8)
