"""Training engine: parallel parity against the single-process run, preflight, learning."""

import pytest

from launch.pretrain_sft import check_job
from megatron_swift.config import ConfigError
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
REL_TOL = 1e-5

LLAMA_LAYOUTS = [
    ({"tensor_model_parallel_size": 2}, {}),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
    ({"pipeline_model_parallel_size": 2}, {}),
    ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, {}),
    ({}, {}),  # DP2 against DP1 with 2x gradient accumulation (global batch 4, micro batch 1)
    ({}, {"use_distributed_optimizer": True}),
]
MOE_LAYOUTS = [({"expert_model_parallel_size": 2}, {})]


def test_parallel_layouts_match_single_process_losses(tiny_models, tmp_path):
    llama, mixtral = tiny_models["llama"], tiny_models["mixtral"]
    reference = dict(
        zip(
            ("llama", "mixtral"),
            run_cases([(llama, {}, {}), (mixtral, {}, {})], DATA, tmp_path / "ref", world_size=1),
            strict=True,
        )
    )
    cases = [(llama, *layout) for layout in LLAMA_LAYOUTS] + [(mixtral, *layout) for layout in MOE_LAYOUTS]
    names = ["llama"] * len(LLAMA_LAYOUTS) + ["mixtral"] * len(MOE_LAYOUTS)
    results = run_cases(cases, DATA, tmp_path / "par", world_size=2)
    failures = []
    for name, (_, parallel, train), losses in zip(names, cases, results, strict=True):
        expected = reference[name]
        assert len(losses) == len(expected) == 3
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True))
        if worst > REL_TOL:
            failures.append((name, parallel, train, losses, expected, worst))
    assert not failures, failures
    assert reference["llama"][-1] < reference["llama"][0]  # it trains


@pytest.mark.parametrize(
    ("parallel", "train", "world", "field"),
    [
        ({"tensor_model_parallel_size": 3}, {}, 3, "num_attention_heads=4 is not divisible by tensor parallel 3"),
        ({"pipeline_model_parallel_size": 3}, {}, 3, "num_hidden_layers=4 is not divisible by pipeline stages 3"),
        ({}, {"global_batch_size": 3}, 2, "train.global_batch_size=3 is not divisible"),
        ({"expert_model_parallel_size": 2}, {}, 2, "expert parallel 2 needs a MoE model"),
        ({"sequence_parallel": True}, {}, 1, "parallel.sequence_parallel needs tensor_model_parallel_size > 1"),
        ({"context_parallel_size": 2}, {}, 2, "parallel.context_parallel_size > 1 needs Transformer Engine"),
        ({}, {"fp8_format": "hybrid", "fp8_recipe": "delayed"}, 1, "train.fp8_format: FP8 needs a CUDA GPU"),
        ({}, {"min_lr": 1.0}, 1, "train.min_lr=1.0 exceeds train.lr"),
    ],
)
def test_preflight_names_the_field(tiny_models, tmp_path, parallel, train, world, field):
    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), parallel, train)
    with pytest.raises(ConfigError) as error:
        check_job(job, world)
    assert field in str(error.value)


def test_preflight_reports_every_problem_at_once(tiny_models, tmp_path):
    job = job_for(
        str(tiny_models["llama"]),
        DATA,
        str(tmp_path),
        {"tensor_model_parallel_size": 3},
        {"global_batch_size": 5, "bf16": True, "fp16": True},
    )
    with pytest.raises(ConfigError) as error:
        check_job(job, 3)
    message = str(error.value)
    assert "train.bf16 and train.fp16" in message and "num_attention_heads=4" in message
