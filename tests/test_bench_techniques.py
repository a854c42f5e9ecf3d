"""`python -m megatron_swift.bench techniques`: two real runs and a failing one (one process each, 3 steps; slow
suite), and the bad-input errors, which come before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_swift.bench.__main__ import main
from megatron_swift.quiet import SUMMARY
from megatron_swift.training.measure import median_step_seconds, tokens_per_second

SFT = Path(__file__).resolve().parents[1] / "examples" / "data" / "sft_sample.jsonl"
WARMUP = 1


def _job(tmp_path, hf_dir) -> str:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{hf: {hf_dir}}}\n"
        f"data: {{dataset: [{SFT}], seq_length: 64, split_dataset_ratio: 0.2}}\n"
        "train: {task: sft, train_type: lora, micro_batch_size: 2, global_batch_size: 4, train_iters: 3, lr: 1.0e-2,"
        " lr_warmup_iters: 1, lr_decay_style: constant, seed: 7, eval_interval: 2}\n"
        "lora: {rank: 4, alpha: 8}\n"
        "logging: {tensorboard: false}\n"
    )
    return str(job)


@pytest.fixture(scope="module")
def comparison(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    code = main(["techniques", "--config", _job(tmp, tiny_models["llama"]), "--techniques", "lora,full",
                 "--technique", "broken=--train.recompute_granularity full", "--warmup", str(WARMUP),
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads((out / "techniques.json").read_text())
    return out, {row["technique"]: row for row in results["rows"]}, results


def _records(out, name) -> list[dict]:
    path = out / "runs" / name / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # three fresh training processes; the bad-input tests below stay in the default suite
def test_rows_are_read_from_each_runs_logs(comparison, tiny_models):
    from transformers import AutoModelForCausalLM

    out, rows, _ = comparison
    hf_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).parameters())
    for name in ("lora", "full"):
        row, records = rows[name], _records(out, name)
        summary = json.loads((out / "runs" / name / "logs" / "run_summary.json").read_text())
        assert row["status"] == "ok" and len(records) == 3 == row["steps"]
        assert row["loss_curve"] == {"step": [1, 2, 3], "loss": [r["loss"] for r in records]}
        assert row["final_train_loss"] == records[-1]["loss"]
        assert row["final_val_loss"] == [r["val_loss"] for r in records if "val_loss" in r][-1]
        # the same measurement code as the step benchmarks: median after warm-up, tokens per step / median
        median = median_step_seconds([r["step_seconds"] for r in records], WARMUP)
        assert row["step_seconds_median"] == round(median, 5)
        assert row["tokens_per_sec"] == round(tokens_per_second(4 * 64, median), 1)
        assert row["peak_memory_gib_per_rank"] == [round(b / 2**30, 4) for b in summary["peak_memory_bytes_per_rank"]]
        assert 0 < row["peak_memory_gib_max"] < 64
    assert rows["full"]["trainable_parameters"] == hf_parameters  # counted against transformers' own model
    assert rows["lora"]["total_parameters"] == hf_parameters + rows["lora"]["trainable_parameters"]
    assert 0 < rows["lora"]["trainable_parameters"] < hf_parameters // 10
    # same data, seed and weights: LoRA's first step (lora_B = 0) is the base model's, as full training's
    assert rows["lora"]["loss_curve"]["loss"][0] == pytest.approx(rows["full"]["loss_curve"]["loss"][0], abs=1e-5)
    assert rows["lora"]["loss_curve"]["loss"][-1] != rows["full"]["loss_curve"]["loss"][-1]


@pytest.mark.slow  # three fresh training processes; the bad-input tests below stay in the default suite
def test_the_plot_draws_the_metrics_files_values(comparison):
    import matplotlib.pyplot as plt

    from megatron_swift.bench.report import figure

    out, rows, results = comparison
    assert (out / "techniques.png").stat().st_size > 10_000
    fig = figure(results)
    curves, memory, speed = fig.axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in curves.get_lines()}
    plt.close(fig)
    assert set(drawn) == {"lora", "full"}  # the failed technique has no curve
    for name, (steps, losses) in drawn.items():
        records = _records(out, name)
        assert steps == [r["step"] for r in records] and losses == [r["loss"] for r in records]
    assert [bar.get_height() for bar in memory.patches] == [rows[n]["peak_memory_gib_max"] for n in drawn]
    assert [bar.get_height() for bar in speed.patches] == [rows[n]["tokens_per_sec"] for n in drawn]


@pytest.mark.slow  # three fresh training processes; the bad-input tests below stay in the default suite
def test_a_failed_technique_is_reported_in_its_row(comparison):
    out, rows, _ = comparison
    broken = rows["broken"]
    assert broken["status"] == "failed" and "train.recompute_method" in broken["error"]
    table = (out / "techniques.md").read_text()
    line = next(line for line in table.splitlines() if line.startswith("| broken |"))
    assert "failed:" in line and "train.recompute_method: required" in line
    assert "| lora | 1 |" in table and "| full | 1 |" in table


@pytest.mark.parametrize(
    ("techniques", "expected"),
    [
        (["--techniques", "lora,qlora"], "unknown technique 'qlora'; known: full, lora, rslora, dora"),
        (["--techniques", "tp2+dp2,full+tp2"], None),  # valid combinations: the error then is the bad field below
        (["--technique", "mine=--lora.rnk 4"], "technique 'mine': lora.rnk"),
        (["--technique", "lora=--lora.rank 4"], "with a new NAME"),
        (["--techniques", "lora,lora"], "technique 'lora' is given twice"),
        ([], "no techniques given"),
    ],
)
def test_bad_input_is_refused_before_any_run(tmp_path, tiny_models, capsys, techniques, expected):
    out = tmp_path / "out"
    argv = ["techniques", "--config", _job(tmp_path, tiny_models["llama"]), *techniques, "--out", str(out)]
    if expected is None:  # a shared override naming no field: every technique's job is refused
        argv += ["--train.lrr", "1"]
        expected = "train.lrr"
    assert main(argv) == 2
    # The first entry point of this process also prints the one line saying what third-party noise it silenced.
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if line != SUMMARY)
    assert err.startswith("error:") and expected in err
    assert not out.exists()  # nothing ran


def test_a_missing_job_file_and_eval_set_are_refused(tmp_path, tiny_models, capsys):
    assert main(["techniques", "--config", str(tmp_path / "nope.yaml"), "--techniques", "lora"]) == 2
    assert "nope.yaml: no such job file" in capsys.readouterr().err
    argv = ["techniques", "--config", _job(tmp_path, tiny_models["llama"]), "--techniques", "lora",
            "--eval-agent", str(tmp_path / "agent.jsonl"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "--eval-agent" in capsys.readouterr().err and not (tmp_path / "out").exists()
