"""The post-training example chain: train tiny -> export -> eval base vs tuned -> quantize -> vLLM check.

The whole chain (examples/post_training.sh, with megatron-core training) is `slow`; its after-training
half (examples/eval_and_quantize.sh) runs by default on a base model and an HF-side fine-tune of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.serve.export_check import check_export
from tests.tiny_tuning import fine_tune

ROOT = Path(__file__).resolve().parents[1]


def _bash(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _check_outputs(out: Path, quantized: Path, tuned: Path, stdout: str) -> None:
    results = json.loads((out / "eval" / "report.json").read_text())["results"]
    assert set(results) == {"base", "tuned"}
    assert results["tuned"]["perplexity"]["loss"] < results["base"]["perplexity"]["loss"]
    assert results["tuned"]["agent"]["steps"] == 16 and results["tuned"]["qa"]["rows"] == 8
    assert "| metric | base | tuned | tuned - base |" in (out / "eval" / "report.md").read_text()
    report = json.loads((quantized / "report.json").read_text())
    assert report["size_ratio"] < 0.6 and abs(report["perplexity_ratio"] - 1) < 0.01
    assert f"vllm serve {tuned} --tensor-parallel-size 1 --max-model-len 512" in stdout
    assert check_export(tuned) == []


def test_eval_and_quantize_script(tmp_path):
    base = make_tiny_model("qwen2", tmp_path / "base", seed=7)
    tuned = fine_tune(base, tmp_path / "tuned")
    result = _bash(ROOT / "examples" / "eval_and_quantize.sh", base, tuned, tmp_path / "out")
    _check_outputs(tmp_path / "out", tmp_path / "out" / "tuned-int8", tuned, result.stdout)


@pytest.mark.slow
def test_post_training_chain(tmp_path):
    out = tmp_path / "chain"
    result = _bash(ROOT / "examples" / "post_training.sh", out)
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    _check_outputs(out, out / "tuned-int8", out / "hf-tuned", result.stdout)
