"""gpt-oss against HF transformers' GptOssForCausalLM (and its MXFP4 dequantizer) as the reference.

The tiny model (4 layers alternating an 8-token sliding window and full attention, the tests' sequences 32 tokens;
8 experts, top-2) also runs through every family-wide test: the bit-exact round trip, logits at TP1 / TP2 / PP2 /
EP2 (test_check.py), 3 steps at TP2 + SP with the experts shared by the TP ranks (test_training.py). Here: what the
tiny model holds, the translation and refusals, the experts' clamped SwiGLU (with the clamp engaged in the logits),
MXFP4 checkpoints against transformers' dequantizer (read and converted), step-1 loss and gradient vs HF; in the
slow suite the default rope, and 3 steps at TP2 + SP, TP2 + SP + EP2, PP2 and EP2.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.check import check
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.config import ConfigError
from megatron_swift.models import all_families, translate
from megatron_swift.models.tiny import make_tiny_model, tiny_hf_config
from tests.test_deepseek_v3 import _global_batch, _hf_step, _metrics
from tests.test_roundtrip import _hf_tensors, assert_bit_exact
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
FAMILY = "gpt_oss"
NO_AUX = {"moe_aux_loss_coeff": 0.0}  # HF's loss has no router loss (output_router_logits=false)


def _config(**overrides):
    return tiny_hf_config(all_families()[FAMILY], **overrides)


def test_tiny_model_has_what_gpt_oss_has(tiny_models):
    tensors = load_file(tiny_models[FAMILY] / "model.safetensors")
    layer = "model.layers.1"
    for name in ("self_attn.sinks", "self_attn.o_proj.bias", "self_attn.q_proj.bias", "mlp.router.bias"):
        assert f"{layer}.{name}" in tensors, name
    assert tensors[f"{layer}.mlp.experts.gate_up_proj"].shape == (8, 64, 64)  # [experts, hidden, 2 x ffn]
    assert tensors[f"{layer}.mlp.experts.down_proj"].shape == (8, 32, 64)  # [experts, ffn, hidden]
    assert tensors[f"{layer}.mlp.experts.gate_up_proj_bias"].shape == (8, 64)
    config = _config()
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["truncate"], rope["rope_theta"]) == ("yarn", 32.0, False, 150000)


def test_translation():
    from megatron.core.activations import quick_gelu

    args = translate(_config())
    t = args.transformer
    assert t["add_bias_linear"] and t["add_qkv_bias"] and t["softmax_type"] == "learnable"
    assert t["window_size"] == (7, 0) and t["window_attn_skip_freq"] == [1, 0, 1, 0]
    assert t["activation_func"] is quick_gelu and t["glu_linear_offset"] == 1.0
    assert t["activation_func_clamp_value"] == 7.0 and t["gated_linear_unit"]
    assert (t["num_moe_experts"], t["moe_router_topk"], t["moe_ffn_hidden_size"]) == (8, 2, 32)
    assert t["moe_router_score_function"] == "softmax" and not t["moe_router_pre_softmax"]  # softmax over the top-k
    assert args.position_embedding_type == "yarn" and args.rotary_base == 150000
    assert args.yarn == dict(
        yarn_rotary_scaling_factor=32.0,
        yarn_original_max_position_embeddings=4096,
        yarn_beta_fast=32.0,
        yarn_beta_slow=1.0,
        yarn_mscale=None,
        yarn_mscale_all_dim=None,
        yarn_correction_range_round_to_int=False,
    )


def test_training_preflight_refuses_tes_fused_rope_with_yarn(tiny_models, tmp_path):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models[FAMILY]), DATA, str(tmp_path), {}, {}, apply_rope_fusion=True)
    with pytest.raises(ConfigError, match=r"model\.apply_rope_fusion: Transformer Engine's fused RoPE has no YaRN"):
        check_job(job, 1)


def test_biased_experts_need_expert_tensor_parallel_one():
    from megatron_swift.config import ParallelConfig
    from megatron_swift.models.layout import model_layout_problems

    args = translate(_config())
    (problem,) = model_layout_problems(args, ParallelConfig(tensor_model_parallel_size=2))
    assert "parallel.expert_tensor_parallel_size=2 (it defaults to tensor_model_parallel_size)" in problem
    assert not model_layout_problems(args, ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1))
    mixtral = translate(tiny_hf_config(all_families()["mixtral"]))
    assert not model_layout_problems(mixtral, ParallelConfig(tensor_model_parallel_size=2))  # unbiased experts


def test_megatrons_gated_unit_is_hfs_clamped_swiglu_on_the_interleaved_layout():
    """megatron-core's MLP glu (activation_func_clamp_value, glu_linear_offset) on [gate; up] from the mapping vs
    HF's GptOssExperts._apply_gate on the interleaved columns, with values far beyond the clamp on both sides."""
    from megatron.core.activations import quick_gelu
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from megatron_swift.models.families.gpt_oss import RULES
    from megatron_swift.models.mapping import ExpertSlice

    experts = GptOssExperts(_config(swiglu_limit=7.0))
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator) * 3  # HF [hidden, 2 x ffn], gate / up interleaved
    bias = torch.randn(64, generator=generator) * 3
    x = torch.randn(16, 64, generator=generator)
    hf = experts._apply_gate(x @ weight + bias)
    fc1_weight, fc1_bias = (rule for rule in RULES if isinstance(rule, ExpertSlice) and "linear_fc1" in rule.mcore)
    w, b = fc1_weight.to_mcore([weight], None), fc1_bias.to_mcore([bias], None)
    gate, up = torch.chunk(x @ w.t() + b, 2, dim=-1)  # megatron-core's mlp.py glu
    assert gate.max() > 7 and gate.min() < -7 and up.max() > 7 and up.min() < -7
    ours = quick_gelu(gate.clamp(min=None, max=7.0)) * (up.clamp(min=-7.0, max=7.0) + 1.0)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5 is not supported"),
        ({"attention_bias": False}, "attention_bias=false is not supported for gpt_oss"),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "original_max_position_embeddings": 4096,
                    "attention_factor": 2.0,
                }
            },
            "rope_parameters.attention_factor=2.0 is not supported",
        ),
        ({"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types=.*one of sliding_attention"),
    ],
)
def test_what_megatron_cannot_express_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        translate(_config(**overrides))


def _converted_logits(tmp_path, **overrides):
    source = make_tiny_model(FAMILY, tmp_path / "hf", seed=11, **overrides)
    mcore = hf_to_mcore(source, tmp_path / "mcore")
    result = check(source, mcore)
    print(overrides, result)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result
    return source, mcore


def test_clamp_engaged_logits(tmp_path):
    """swiglu_limit 0.1: most gate / up values are clamped (the tiny model's are ~0.4), through megatron-core's
    own expert MLP."""
    _converted_logits(tmp_path, swiglu_limit=0.1)


@pytest.mark.slow  # the tiny model (YaRN) runs in the default suite's round trip and logits tests
def test_default_rope_round_trip_and_logits(tmp_path):
    source, mcore = _converted_logits(
        tmp_path, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    assert_bit_exact(source, mcore_to_hf(mcore, tmp_path / "out"))


# --- MXFP4 -------------------------------------------------------------------------------------------------------

_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout expert weight [experts, in, out] -> (blocks [experts, out, in / 32, 16], scales [experts, out,
    in / 32]) as gpt-oss checkpoints store them: per 32 inputs a power-of-two scale putting the largest at <= 6,
    each value the nearest FP4 code, two codes a byte (low nibble first)."""
    rows = weight.transpose(1, 2).float()  # [experts, out, in]
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0))
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - _FP4).abs().argmin(-1).to(torch.uint8)  # [.., groups, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def _mxfp4_checkpoint(source, out):
    """`source` (an unquantized tiny gpt-oss) with its experts in MXFP4, as the published checkpoints."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = _quantize_mxfp4(tensors.pop(name))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
        "quant_method": "mxfp4",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def _transformers_dequantized(mxfp4_dir, out, dtype):
    """What transformers' own dequantizer makes of the MXFP4 experts, saved unquantized: the reference model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    shutil.copytree(mxfp4_dir, out)
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_blocks")]:
        weight = name.removesuffix("_blocks")
        tensors[weight] = convert_moe_packed_tensors(tensors.pop(name), tensors.pop(weight + "_scales"), dtype=dtype)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}))
    return out


def test_mxfp4_experts_dequantize_as_transformers(tiny_models, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from megatron_swift.checkpoint.hf import HFCheckpoint
    from megatron_swift.checkpoint.mxfp4 import dequantize

    quantized = _mxfp4_checkpoint(tiny_models[FAMILY], tmp_path / "mxfp4")
    stored = load_file(quantized / "model.safetensors")
    ckpt = HFCheckpoint(quantized)
    name = "model.layers.2.mlp.experts.gate_up_proj"
    blocks, scales = stored[name + "_blocks"], stored[name + "_scales"]
    assert blocks.dtype == torch.uint8 and blocks.shape == (8, 64, 2, 16) and scales.shape == (8, 64, 2)
    for dtype in (torch.float32, torch.bfloat16):
        reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(dequantize(blocks, scales).to(dtype), reference), dtype
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(ckpt.get(name), reference) and torch.equal(ckpt.get(name + "[5]"), reference[5])
    assert ckpt.info(name).shape == (8, 64, 64) and ckpt.dtype == torch.float32
    # The quantizer kept the weights close (FP4: within a sixth of the largest), and not equal (so it ran).
    original = load_file(tiny_models[FAMILY] / "model.safetensors")[name]
    assert 0 < (reference - original).abs().max() < original.abs().max() / 6


def test_mxfp4_checkpoint_converts_to_transformers_dequantized_model(tiny_models, tmp_path):
    """Converted and exported: transformers' dequantized model, bit for bit, without the quantization_config; the
    converted model's logits are that model's."""
    quantized = _mxfp4_checkpoint(tiny_models[FAMILY], tmp_path / "mxfp4")
    expected = _transformers_dequantized(quantized, tmp_path / "dequantized", torch.float32)
    mcore = hf_to_mcore(quantized, tmp_path / "mcore")
    exported = mcore_to_hf(mcore, tmp_path / "hf")
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    before, after = _hf_tensors(expected), _hf_tensors(exported)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    result = check(expected, mcore)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_mxfp4_without_scales_is_refused(tiny_models, tmp_path):
    from megatron_swift.checkpoint.hf import CheckpointError, HFCheckpoint

    quantized = _mxfp4_checkpoint(tiny_models[FAMILY], tmp_path / "mxfp4")
    tensors = load_file(quantized / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj_blocks .* has no matching U8 .*down_proj_scales"):
        HFCheckpoint(quantized)


# --- training ----------------------------------------------------------------------------------------------------


def test_step_one_loss_and_gradient_equal_hf(tiny_models, tmp_path):
    from megatron_swift.training.job import train

    hf_dir = tiny_models[FAMILY]
    job = job_for(str(hf_dir), DATA, str(tmp_path / "run"), {}, {"train_iters": 1}, moe=NO_AUX)
    (step1,) = train(job)
    loss, grad_norm, _ = _hf_step(hf_dir, _global_batch(job, hf_dir))
    print(f"step 1: loss {step1.loss} vs HF {loss}, grad norm {step1.grad_norm} vs HF {grad_norm}")
    assert abs(step1.loss - loss) / loss < 1e-5, (step1.loss, loss)
    assert abs(step1.grad_norm - grad_norm) / grad_norm < 1e-4, (step1.grad_norm, grad_norm)


def test_sinks_are_split_by_heads_and_counted_on_every_tp_rank(tiny_models, tmp_path):
    """The sinks are split over TP by heads; megatron-core's gradient norm counts a parameter on every TP rank only
    when it is tagged tensor_model_parallel (its DotProductAttention leaves the sinks untagged: TP rank 1's would
    be left out of the norm and the clipping)."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job

    job = job_for(str(tiny_models[FAMILY]), DATA, str(tmp_path), {}, {})
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        sinks = [p for n, p in build_model(job, args)[0].named_parameters() if n.endswith("softmax_offset")]
    finally:
        destroy_distributed()
    assert len(sinks) == 4 and all(p.shape == (4,) for p in sinks)
    assert all(p.tensor_model_parallel and p.partition_dim == 0 for p in sinks)


@pytest.mark.slow  # test_training.py runs TP2 + SP (expert TP 1) of this model in its default-suite launch
def test_three_steps_at_tp2_sp_tp2_ep2_pp2_ep2_equal_the_single_process(tiny_models, tmp_path):
    hf_dir = tiny_models[FAMILY]
    tp2_sp = {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_tensor_parallel_size": 1}
    layouts = [
        tp2_sp,  # the experts shared by the TP ranks (models/builder.py _expert_gradient_reduction)
        {**tp2_sp, "expert_model_parallel_size": 2},  # experts over the TP ranks: their fc2 biases not summed by TP
        {"pipeline_model_parallel_size": 2},
        {"expert_model_parallel_size": 2},
    ]
    (reference,) = run_cases([(hf_dir, {}, {}, None, {}, None, NO_AUX)], DATA, tmp_path / "ref", world_size=1)
    cases = [(hf_dir, layout, {}, None, {}, None, NO_AUX) for layout in layouts]
    results = run_cases(cases, DATA, tmp_path / "par", world_size=2)
    expected_norms = [r["grad_norm"] for r in _metrics(tmp_path / "ref" / "case0")]
    failures = []
    for index, (layout, losses) in enumerate(zip(layouts, results, strict=True)):
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        norms = [r["grad_norm"] for r in _metrics(tmp_path / "par" / f"case{index}")]
        norm_diffs = [abs(a - b) / b for a, b in zip(norms, expected_norms, strict=True)]
        print(f"{layout}: worst relative loss difference {worst:.2e}, grad norms {norm_diffs}")
        if len(losses) != 3 or worst > 1e-5 or max(norm_diffs) > 1e-5:
            failures.append((layout, losses, reference, norms, expected_norms))
    assert not failures, failures
    assert reference[-1] < reference[0]
