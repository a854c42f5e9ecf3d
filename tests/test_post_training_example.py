"""The post-training example chain: train tiny -> export -> eval base vs tuned -> quantize -> vLLM check.

examples/post_training.sh (megatron-core training included) and its after-training half
examples/eval_and_quantize.sh run in fresh processes and are `slow`; by default the same
eval -> quantize -> serve steps run in this process, with the script's arguments, on a base model
and an HF-side fine-tune of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_swift.eval.__main__ import main as eval_main
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.quantize.__main__ import main as quantize_main
from megatron_swift.serve.__main__ import main as serve_main
from megatron_swift.serve.export_check import check_export
from tests.tiny_tuning import fine_tune

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _bash(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _check_outputs(out: Path, quantized: Path, tuned: Path, stdout: str) -> None:
    results = json.loads((out / "eval" / "report.json").read_text())["results"]
    base, tuned_results = results["base"], results["tuned"]
    assert set(results) == {"base", "tuned"}
    assert tuned_results["perplexity"]["loss"] < base["perplexity"]["loss"]  # training lowered the loss
    assert tuned_results["agent"]["steps"] == 16 and tuned_results["agent"]["call_steps"] == 8
    assert tuned_results["qa"]["rows"] == 8
    assert len((out / "eval" / "predictions-tuned-agent.jsonl").read_text().splitlines()) == 16
    markdown = (out / "eval" / "report.md").read_text()
    assert "| metric | base | tuned | tuned - base |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| perplexity.loss |"))
    delta = float(row.strip("|").split("|")[3])
    assert delta == pytest.approx(tuned_results["perplexity"]["loss"] - base["perplexity"]["loss"], abs=1e-4)
    report = json.loads((quantized / "report.json").read_text())
    assert report["size_ratio"] < 0.6 and abs(report["perplexity_ratio"] - 1) < 0.01
    assert f"vllm serve {tuned} --tensor-parallel-size 1 --max-model-len 512" in stdout
    assert check_export(tuned) == []


@pytest.fixture
def base_and_tuned(tmp_path) -> tuple[Path, Path]:
    base = make_tiny_model("qwen2", tmp_path / "base", seed=7)
    return base, fine_tune(base, tmp_path / "tuned")


def test_eval_quantize_serve_in_process(base_and_tuned, tmp_path, capsys):
    (base, tuned), out = base_and_tuned, tmp_path / "out"
    # The arguments of examples/eval_and_quantize.sh.
    assert eval_main([
        "--model", f"base={base}", "--model", f"tuned={tuned}", "--perplexity", str(DATA / "sft_sample.jsonl"),
        "--seq-length", "64", "--qa", str(DATA / "qa_sample.jsonl"), "--agent", str(DATA / "agent_sample.jsonl"),
        "--max-new-tokens", "24", "--out", str(out / "eval"),
    ]) == 0  # fmt: skip
    argv = ["--model", str(tuned), "--out", str(out / "tuned-int8"), "--eval-data", str(DATA / "sft_sample.jsonl")]
    assert quantize_main([*argv, "--seq-length", "64"]) == 0
    assert serve_main(["--model", str(tuned), "--max-model-len", "512", "--dry-run"]) == 0
    _check_outputs(out, out / "tuned-int8", tuned, capsys.readouterr().out)


@pytest.mark.slow
def test_eval_and_quantize_script(base_and_tuned, tmp_path):
    base, tuned = base_and_tuned
    result = _bash(ROOT / "examples" / "eval_and_quantize.sh", base, tuned, tmp_path / "out")
    _check_outputs(tmp_path / "out", tmp_path / "out" / "tuned-int8", tuned, result.stdout)


@pytest.mark.slow
def test_post_training_chain(tmp_path):
    out = tmp_path / "chain"
    result = _bash(ROOT / "examples" / "post_training.sh", out)
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    _check_outputs(out, out / "tuned-int8", out / "hf-tuned", result.stdout)
