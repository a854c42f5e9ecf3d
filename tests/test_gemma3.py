"""Gemma 3 text against HF transformers' Gemma3ForCausalLM as the reference.

The tiny model (6 layers: 5 sliding-window layers of 8 tokens + 1 global, the tests' sequences 24-32 tokens) also
runs through every family-wide test: the bit-exact round trip, logits at TP1 / TP2 / PP2 (test_check.py), the
merged LoRA export against PEFT (test_lora.py), and 3 steps at TP2 + SP / PP2 in test_training.py's launch. Here:
what the tiny model holds, the translation, the refusals, the global layers' linear rope scaling, step-1 loss
and gradient vs HF, the FLOPs' window term, and (slow suite) 3 steps at TP2 / PP2 / TP2 + SP / CP2 / packed.
"""

import pytest
import torch
from safetensors.torch import load_file

from converters.check import check
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.config import ConfigError
from megatron_swift.models import all_families, translate
from megatron_swift.models.tiny import make_tiny_model, tiny_hf_config
from tests.test_deepseek_v3 import _global_batch, _hf_step, _metrics
from tests.test_roundtrip import assert_bit_exact
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
FAMILY = "gemma3"


def _config(**overrides):
    return tiny_hf_config(all_families()[FAMILY], **overrides)


def test_tiny_model_has_what_gemma_3_has(tiny_models):
    tensors = load_file(tiny_models[FAMILY] / "model.safetensors")
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert all(f"model.layers.5.{norm}.weight" in tensors for norm in norms)
    assert "model.layers.0.self_attn.q_norm.weight" in tensors and "lm_head.weight" not in tensors  # tied
    config = _config()
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000


def test_translation():
    from megatron_swift.models.hf_config import gelu_tanh

    args = translate(_config())
    t = args.transformer
    assert t["window_size"] == (7, 0) and t["window_attn_skip_freq"] == [1, 1, 1, 1, 1, 0]
    assert t["softmax_scale"] == 24**-0.5 and t["layernorm_zero_centered_gamma"] and t["qk_layernorm"]
    assert t["activation_func"] is gelu_tanh and t["gated_linear_unit"]
    assert (args.rotary_base, args.window_rotary_base, args.embedding_multiplier) == (1e6, 1e4, 8.0)
    assert args.output_norms and args.sliding_window is None and args.share_embeddings_and_output_weights
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(gelu_tanh(x), _hf_activation("gelu_pytorch_tanh")(x), rtol=0, atol=0)
    # Every layer global: no window.
    assert "window_size" not in translate(_config(layer_types=["full_attention"] * 6)).transformer


def _hf_activation(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
        ({"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported for gemma3"),
        ({"attention_bias": True}, "attention_bias=true"),
        (
            {"layer_types": ["sliding_attention"] * 5 + ["chunked_attention"]},
            "layer_types=.*one of sliding_attention, full_attention per layer",
        ),
        (
            {
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                }
            },
            "rope_parameters.sliding_attention.rope_type='linear' is not supported",
        ),
    ],
)
def test_what_megatron_cannot_express_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        translate(_config(**overrides))


def test_global_layers_linear_rope_scaling_round_trip_and_logits(tmp_path):
    """Gemma-3-4B / 12B / 27B text configs scale the global layers' rope linearly by 8 (the local ones not)."""
    source = make_tiny_model(FAMILY, tmp_path / "hf", seed=11, rope_scaling={"rope_type": "linear", "factor": 8.0})
    args = translate(_config(rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert args.seq_len_interpolation_factor == 8.0 and args.window_rotary_base == 1e4
    mcore = hf_to_mcore(source, tmp_path / "mcore")
    assert_bit_exact(source, mcore_to_hf(mcore, tmp_path / "out"))
    result = check(source, mcore)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_step_one_loss_and_gradient_equal_hf(tiny_models, tmp_path):
    from megatron_swift.training.job import train

    hf_dir = tiny_models[FAMILY]
    job = job_for(str(hf_dir), DATA, str(tmp_path / "run"), {}, {"train_iters": 1})
    (step1,) = train(job)
    loss, grad_norm, _ = _hf_step(hf_dir, _global_batch(job, hf_dir))
    print(f"step 1: loss {step1.loss} vs HF {loss}, grad norm {step1.grad_norm} vs HF {grad_norm}")
    assert abs(step1.loss - loss) / loss < 1e-5, (step1.loss, loss)
    assert abs(step1.grad_norm - grad_norm) / grad_norm < 1e-4, (step1.grad_norm, grad_norm)


def test_training_preflight_names_the_field(tiny_models, tmp_path):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models[FAMILY]), DATA, str(tmp_path), {}, {}, attention="local")
    with pytest.raises(ConfigError, match=r"model\.attention=local: the sliding-window layers"):
        check_job(job, 1)


def test_flops_count_each_sliding_window_layer_over_its_window():
    """Full layers attend to seq / 2 keys on average, a window of W to W - W^2 / (2 seq) (the same continuous
    count: the integral of min(position, W) over the sequence, divided by its length)."""
    from megatron_swift.training.flops import flops_per_token

    args = translate(_config())
    t = dict(args.transformer)
    seq, heads, head_dim = 64, 4, 16
    windowed = flops_per_token(t, args.vocab_size, seq)
    t.pop("window_size")
    full = flops_per_token(t, args.vocab_size, seq)
    per_key = 3 * 2 * 2 * heads * head_dim  # training x (scores + weighted sum) x multiply-add, per attended key
    assert full - windowed == pytest.approx(5 * per_key * (seq / 2 - (8 - 8**2 / (2 * seq))))
    assert flops_per_token(args.transformer, args.vocab_size, 8) == pytest.approx(
        flops_per_token(t, args.vocab_size, 8)
    )


@pytest.mark.slow  # test_training.py runs TP2 + SP and PP2 of this model in its default-suite launch
def test_three_steps_at_tp2_pp2_sp_cp2_and_packed_equal_the_single_process(tiny_models, tmp_path):
    hf_dir = tiny_models[FAMILY]
    packed = {"packing": True}
    layouts = [
        ({"tensor_model_parallel_size": 2}, None),
        ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, None),
        ({"pipeline_model_parallel_size": 2}, None),
        ({"context_parallel_size": 2}, None),  # the window by global position over the two ranks' chunks
        ({"tensor_model_parallel_size": 2}, packed),  # the window with the packed (THD) masks
    ]
    references = run_cases(
        [(hf_dir, {}, {}), (hf_dir, {}, {}, None, {}, None, None, packed)], DATA, tmp_path / "ref", world_size=1
    )
    cases = [(hf_dir, parallel, {}, None, {}, None, None, data) for parallel, data in layouts]
    results = run_cases(cases, DATA, tmp_path / "par", world_size=2)
    failures = []
    for index, ((parallel, data), losses) in enumerate(zip(layouts, results, strict=True)):
        reference = references[1 if data else 0]
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        expected_norms = [r["grad_norm"] for r in _metrics(tmp_path / "ref" / f"case{1 if data else 0}")]
        norms = [r["grad_norm"] for r in _metrics(tmp_path / "par" / f"case{index}")]
        norm_diffs = [abs(a - b) / b for a, b in zip(norms, expected_norms, strict=True)]
        print(f"{parallel} {data}: worst relative loss difference {worst:.2e}, grad norms {norm_diffs}")
        # Step 1's gradient exactly; later steps' norms within 1e-3: Adam's first steps move every weight by ~lr
        # whatever its gradient's size, so fp32 sums in another order (TP2: 1.6e-5 at step 2; CP2: 2e-4 at step 3)
        # grow in this model's large gradient (norm ~60), while the losses stay within 1e-5. With adam_eps 1e-2
        # (updates proportional to small gradients) CP2's three norms are within 6e-7 of one process's.
        if len(losses) != 3 or worst > 1e-5 or norm_diffs[0] > 1e-5 or max(norm_diffs) > 1e-3:
            failures.append((parallel, data, losses, reference, norms, expected_norms))
    assert not failures, failures
    # The sample rows are longer than 32 tokens, so a packed row holds one document: the same losses, through the
    # THD path (cu_seqlens masks) with the window.
    assert references[0][-1] < references[0][0] and references[1] == pytest.approx(references[0], rel=1e-6)
