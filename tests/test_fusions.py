"""Which megatron-core fusions a training run turns on (training/fusions.py), and the errors for ones that
cannot run. The GPU side (TE rope, Apex wgrad) is decided here from a described machine; the fusions that
do run on a CPU (the jit-compiled ones) are trained against the unfused run in a slow test."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_swift.training.config import JobConfig, ModelSection, environment_problems, transformer_overrides
from megatron_swift.training.fusions import Machine, fusion_problems, resolve_fusions
from tests.train_matrix import run_cases

AUTO_FUSIONS = ("apply_rope_fusion", "bias_dropout_fusion", "bias_activation_fusion", "gradient_accumulation_fusion")
CPU = Machine(cuda=False, transformer_engine=False, apex_fused_wgrad=False)
GPU_TE_APEX = Machine(cuda=True, transformer_engine=True, apex_fused_wgrad=True)
GPU_BARE = Machine(cuda=True, transformer_engine=False, apex_fused_wgrad=False)


def test_auto_turns_on_what_the_machine_and_spec_support():
    auto = ModelSection()
    assert not any(resolve_fusions(auto, te_spec=False, machine=CPU)[name] for name in AUTO_FUSIONS)
    assert all(resolve_fusions(auto, te_spec=True, machine=GPU_TE_APEX)[name] for name in AUTO_FUSIONS)
    bare = resolve_fusions(auto, te_spec=False, machine=GPU_BARE)
    assert bare == {"apply_rope_fusion": False, "bias_dropout_fusion": True, "bias_activation_fusion": False,
                    "gradient_accumulation_fusion": False, "cross_entropy_loss_fusion": False,
                    "cross_entropy_fusion_impl": "native"}  # fmt: skip
    # Local spec on a full GPU machine: our SwiGLU kernel keeps the activation.
    assert resolve_fusions(auto, te_spec=False, machine=GPU_TE_APEX)["bias_activation_fusion"] is False


def test_explicit_choices_win_over_auto():
    model = ModelSection(apply_rope_fusion=False, bias_dropout_fusion=True, cross_entropy_loss_fusion=True)
    on_gpu = resolve_fusions(model, te_spec=True, machine=GPU_TE_APEX)
    assert on_gpu["apply_rope_fusion"] is False and on_gpu["cross_entropy_loss_fusion"] is True
    assert resolve_fusions(model, te_spec=False, machine=CPU)["bias_dropout_fusion"] is True


@pytest.mark.parametrize(
    "options, machine, field",
    [
        ({"apply_rope_fusion": True}, GPU_BARE, "model.apply_rope_fusion"),
        ({"apply_rope_fusion": True}, CPU, "model.apply_rope_fusion"),
        ({"gradient_accumulation_fusion": True}, Machine(True, True, False), "model.gradient_accumulation_fusion"),
        ({"cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "te"}, GPU_BARE,
         "model.cross_entropy_fusion_impl"),
        ({"cross_entropy_loss_fusion": True, "fused_linear_cross_entropy": True}, CPU,
         "model.cross_entropy_loss_fusion and model.fused_linear_cross_entropy"),
    ],
)  # fmt: skip
def test_fusions_that_cannot_run_name_their_field(options, machine, field):
    problems = fusion_problems(ModelSection(**options), te_spec=False, machine=machine, bf16=True)
    assert len(problems) == 1 and problems[0].startswith(field), problems
    # The same options on a machine that has everything (and without the conflicting pair) are fine.
    fine = {k: v for k, v in options.items() if k != "fused_linear_cross_entropy"}
    assert fusion_problems(ModelSection(**fine), te_spec=True, machine=GPU_TE_APEX, bf16=True) == []


def test_native_fused_cross_entropy_is_refused_outside_bf16():
    """megatron-core's native fused cross entropy casts the logits gradient to bf16 (3e-3 off in fp32)."""
    native = ModelSection(cross_entropy_loss_fusion=True)
    (problem,) = fusion_problems(native, te_spec=False, machine=CPU, bf16=False)
    assert problem.startswith("model.cross_entropy_loss_fusion") and "train.bf16" in problem
    assert fusion_problems(native, te_spec=False, machine=CPU, bf16=True) == []
    te = ModelSection(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    assert fusion_problems(te, te_spec=True, machine=GPU_TE_APEX, bf16=False) == []


def test_this_cpu_machine_reports_forced_fusions_in_preflight_and_runs_without_them():
    job = JobConfig()
    job.model = dataclasses.replace(job.model, spec="local", apply_rope_fusion=True, gradient_accumulation_fusion=True)
    problems = environment_problems(job)
    assert any(p.startswith("model.apply_rope_fusion") for p in problems), problems
    assert any(p.startswith("model.gradient_accumulation_fusion") for p in problems), problems
    overrides = transformer_overrides(JobConfig())
    assert not any(overrides[name] for name in AUTO_FUSIONS) and overrides["cross_entropy_loss_fusion"] is False


@pytest.mark.slow
def test_jit_fusions_train_like_the_plain_paths_on_cpu(tiny_models, tmp_path):
    """megatron's jit fusions (torch.compile: tens of seconds of compiling on a CPU), 3 steps, against the
    unfused run of the same job: bias-dropout-add in fp32 (exact), the native fused cross entropy in bf16
    (both sides round the logits gradient to bf16; compiled exp rounds differently, measured 1.6e-4)."""
    llama = tiny_models["llama"]
    fp32, bf16 = {}, {"bf16": True}
    cases = [(llama, {}, fp32, None, {}), (llama, {}, fp32, None, {"bias_dropout_fusion": True}),
             (llama, {}, bf16, None, {}), (llama, {}, bf16, None, {"cross_entropy_loss_fusion": True})]  # fmt: skip
    plain, fused, plain_bf16, fused_bf16 = run_cases(cases, "examples/data/sft_sample.jsonl", tmp_path, world_size=1)
    assert fused == plain
    assert max(abs(a - b) / b for a, b in zip(fused_bf16, plain_bf16, strict=True)) <= 1e-3, (fused_bf16, plain_bf16)
    assert plain[-1] < plain[0] and plain_bf16[-1] < plain_bf16[0]
