"""GLM-4.5 (q/k/v biases, qk-norm, partial rotary, sigmoid-routed MoE with an expert bias) against HF transformers'
Glm4Moe. The tiny model also runs through every family-wide test (round trip, logits at TP1 / TP2 / PP2 / EP2)."""

import pytest
import torch
from safetensors.torch import load_file

from converters.convert import mcore_to_hf
from tests.test_deepseek_v3 import _exported_biases, _global_batch, _hf_step, _metrics
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
FAMILY = "glm4_moe"


def test_tiny_model_has_what_glm_4_5_has(tiny_models):
    tensors = load_file(tiny_models[FAMILY] / "model.safetensors")
    assert "model.layers.1.self_attn.q_proj.bias" in tensors and "model.layers.1.self_attn.o_proj.bias" not in tensors
    assert "model.layers.1.self_attn.q_norm.weight" in tensors and "model.layers.0.mlp.gate_proj.weight" in tensors
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].abs().min() > 0  # perturbed, not zero


def test_step_one_equals_hf_and_the_expert_bias_moves_by_megatrons_rule(tiny_models, tmp_path):
    from megatron_swift.training.job import train

    hf_dir = tiny_models[FAMILY]
    job = job_for(str(hf_dir), DATA, str(tmp_path / "run"), {}, {"train_iters": 1})
    job.checkpoint.save = str(tmp_path / "ckpt")
    (step1,) = train(job)
    loss, grad_norm, counts = _hf_step(hf_dir, _global_batch(job, hf_dir))
    assert abs(step1.loss - loss) / loss < 1e-5, (step1.loss, loss)
    assert abs(step1.grad_norm - grad_norm) / grad_norm < 1e-4, (step1.grad_norm, grad_norm)
    original, after = _exported_biases(hf_dir), _exported_biases(mcore_to_hf(tmp_path / "ckpt", tmp_path / "hf"))
    assert sorted(counts) == [1, 2, 3]
    for layer, routed in counts.items():
        name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        expected = original[name] + torch.sign(routed.float().mean() - routed.float()) * 1e-3
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-7)


@pytest.mark.slow  # the default suite keeps step one vs HF and the family's TP2 / PP2 / EP2 logits (test_check)
def test_three_steps_at_tp2_sp_pp2_ep2_equal_the_single_process(tiny_models, tmp_path):
    """GLM-4.5 has no load-balancing loss (coefficient 0), so TP2 + SP is compared with it as is."""
    hf_dir = tiny_models[FAMILY]
    layouts = [
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        {"pipeline_model_parallel_size": 2},
        {"expert_model_parallel_size": 2},
    ]
    (reference,) = run_cases([(hf_dir, {}, {})], DATA, tmp_path / "ref", world_size=1)
    results = run_cases([(hf_dir, layout, {}) for layout in layouts], DATA, tmp_path / "par", world_size=2)
    expected_norms = [r["grad_norm"] for r in _metrics(tmp_path / "ref" / "case0")]
    for index, (layout, losses) in enumerate(zip(layouts, results, strict=True)):
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        assert len(losses) == 3 and worst <= 1e-5, (layout, losses, reference)
        norms = [r["grad_norm"] for r in _metrics(tmp_path / "par" / f"case{index}")]
        assert max(abs(a - b) / b for a, b in zip(norms, expected_norms, strict=True)) <= 1e-5, (layout, norms)
    assert reference[-1] < reference[0]
