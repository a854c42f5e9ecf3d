"""Typed config: YAML + dotted overrides, coercion, and validation that reports every problem."""

from dataclasses import dataclass, field

import pytest

from megatron_swift.config import ConfigError, ParallelConfig, load_config, parse_overrides


@dataclass
class Train:
    lr: float = 1e-5
    train_iters: int = 10
    bf16: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    load: str | None = None


@dataclass
class Job:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: Train = field(default_factory=Train)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("parallel:\n  tensor_model_parallel_size: 2\ntrain:\n  lr: 3e-4\n  bf16: true\n")
    job = load_config(
        Job,
        path,
        [
            "--train.lr",
            "1e-4",
            "--parallel.sequence_parallel",
            "--train.train_iters=7",
            "--train.target_modules",
            "linear_qkv,linear_proj",
            "--train.load",
            "none",
        ],
    )
    assert job.parallel.tensor_model_parallel_size == 2
    assert job.parallel.sequence_parallel is True
    assert job.train.lr == pytest.approx(1e-4)
    assert job.train.bf16 is True
    assert job.train.train_iters == 7
    assert job.train.target_modules == ["linear_qkv", "linear_proj"]
    assert job.train.load is None


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(
        ConfigError,
        match=r"parallel\.tensor_parallel_size: unknown field; did you mean "
        r"'tensor_model_parallel_size'",
    ):
        load_config(Job, None, ["--parallel.tensor_parallel_size", "2"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--train.train_iters", "2.5"], "train.train_iters: expected an integer"),
        (["--train.bf16", "maybe"], "train.bf16: expected true/false"),
        (["--train.lr", "fast"], "train.lr: expected a number"),
        (["--train", "x"], "train: expected a mapping"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, override)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1\n  bf16: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(Job, path)


def test_parse_overrides_nests_sections():
    assert parse_overrides(["--a.b.c", "1", "--a.d=x"]) == {"a": {"b": {"c": "1"}, "d": "x"}}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])


def test_parallel_problems_lists_every_problem():
    bad = ParallelConfig(pipeline_model_parallel_size=0, sequence_parallel=True, virtual_pipeline_model_parallel_size=2)
    problems = bad.problems()
    assert len(problems) == 3
    assert any("pipeline_model_parallel_size must be >= 1" in p for p in problems)
    assert any("sequence_parallel needs" in p for p in problems)
    assert any("virtual_pipeline_model_parallel_size > 1 needs" in p for p in problems)


def test_parallel_problems_against_world_size():
    assert ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).problems(8) == []
    (problem,) = ParallelConfig(tensor_model_parallel_size=3).problems(4)
    assert "world size 4 is not divisible" in problem
    (problem,) = ParallelConfig(expert_model_parallel_size=4).problems(2)
    assert "expert_model_parallel_size=4" in problem


def test_every_example_job_file_loads():
    """Field renames must reach the shipped examples (they are what users copy)."""
    from pathlib import Path

    from megatron_swift.config import load_config
    from megatron_swift.training.config import JobConfig

    files = sorted(Path("examples").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        job = load_config(JobConfig, path)
        assert job.data.dataset, path


def _job(parallel: dict | None = None, train: dict | None = None, seq_length: int = 64):
    from megatron_swift.training.config import DataSection, JobConfig, ModelSection, TrainSection

    return JobConfig(
        model=ModelSection(hf="model-dir"),
        data=DataSection(dataset=["data.jsonl"], seq_length=seq_length),
        parallel=ParallelConfig(**(parallel or {})),
        train=TrainSection(**(train or {})),
    )


def test_preflight_reports_batch_context_and_sequence_parallel_problems_together():
    from megatron_swift.training.config import preflight

    job = _job(
        {"tensor_model_parallel_size": 2, "context_parallel_size": 2, "sequence_parallel": True},
        {"global_batch_size": 3, "lr_warmup_iters": 0},
        seq_length=33,
    )
    problems = preflight(job, world_size=8)  # DP 2
    assert "train.global_batch_size=3 is not divisible by micro_batch_size 1 x data parallel 2" in problems
    assert "data.seq_length=33 is not divisible by 2 x context_parallel_size = 4" in problems
    assert "data.seq_length=33 is not divisible by tensor_model_parallel_size=2 (sequence_parallel)" in problems
    # Each rule on its own...
    assert preflight(_job({"context_parallel_size": 2}), 2) == []
    (problem,) = preflight(_job({"context_parallel_size": 3}, seq_length=64), 3)
    assert problem == "data.seq_length=64 is not divisible by 2 x context_parallel_size = 6"
    (problem,) = preflight(_job({"tensor_model_parallel_size": 4, "sequence_parallel": True}, seq_length=66), 4)
    assert problem == "data.seq_length=66 is not divisible by tensor_model_parallel_size=4 (sequence_parallel)"
    # ... and an invalid layout still reports the sequence rules (the batch split is then undefined).
    problems = preflight(_job({"context_parallel_size": 2}, seq_length=30), world_size=3)
    assert any("world size 3 is not divisible" in p for p in problems)
    assert "data.seq_length=30 is not divisible by 2 x context_parallel_size = 4" in problems


@pytest.mark.parametrize(
    ("warmup", "decay_iters", "train_iters"),
    [(3, None, 3), (2, None, 3), (5, 10, 3), (10, 10, 3), (3, 3, 30), (0, 1, 1)],
)
def test_preflight_warmup_rule_is_megatron_cores(warmup, decay_iters, train_iters):
    """Warmup is compared with the decay length (lr_decay_iters when set, else train_iters): preflight refuses
    exactly what megatron-core's scheduler refuses, so a short run of a longer schedule trains."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_swift.training.config import preflight

    train = {"lr_warmup_iters": warmup, "lr_decay_iters": decay_iters, "train_iters": train_iters}
    problems = [p for p in preflight(_job(train=train), 1) if "lr_warmup_iters" in p]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=warmup,
                                lr_decay_steps=decay_iters or train_iters, lr_decay_style="cosine", start_wd=0.0,
                                end_wd=0.0, wd_incr_steps=train_iters, wd_incr_style="constant")  # fmt: skip
        megatron_accepts = True
    except AssertionError:
        megatron_accepts = False
    assert megatron_accepts == (not problems), problems
    if problems:
        name = "train.lr_decay_iters" if decay_iters else "train.train_iters"
        assert problems == [f"train.lr_warmup_iters={warmup} must be smaller than {name}={decay_iters or train_iters}"]
