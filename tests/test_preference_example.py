"""examples/tiny_dpo.yaml as a user runs it (torchrun, 2 processes, TP2 + SP, LoRA DPO), on an HF-side fine-tune of
the tiny Llama standing in for the quickstart's output: the held-out pairs' reward accuracy and margin go up over
the run and their loss goes down; the run's checkpoint exports as a PEFT adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_tuning import fine_tune

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_dpo_example_raises_held_out_reward_accuracy(tiny_models, tmp_path):
    tuned = fine_tune(tiny_models["llama"], tmp_path / "tuned")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
               str(ROOT / "launch" / "pretrain_sft.py"), "--config", str(ROOT / "examples" / "tiny_dpo.yaml"),
               "--model.hf", str(tuned), "--checkpoint.output_dir", str(run),
               "--checkpoint.save", str(run / "checkpoints")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [6, 12, 18, 24] and len(records) == 24
    first, last = evals[0], evals[-1]
    assert last["val_rewards/accuracies"] > first["val_rewards/accuracies"]
    assert last["val_rewards/margins"] > first["val_rewards/margins"] > 0
    assert last["val_loss"] < first["val_loss"] < 0.6931
    export = subprocess.run([sys.executable, "-m", "converters", "mcore-to-hf", "--mcore", str(run / "checkpoints"),
                             "--out", str(tmp_path / "adapter"), "--adapter-only"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-4000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
