"""The sbatch templates run unchanged as a single-node job (SLURM_NNODES=1), here on 2 CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _slurm_env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        # The job's environment has this interpreter's python and torchrun first on PATH (a venv or module).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MSWIFT_NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
    }


def test_convert_train_export_single_node(tiny_models, tmp_path):
    out = tmp_path / "pipeline"
    result = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/convert_train_export.sbatch"), str(tiny_models["llama"]),
         "examples/tiny_sft.yaml", str(out), "--train.train_iters", "2", "--train.lr_warmup_iters", "0",
         "--checkpoint.save_interval", "1", "--checkpoint.save_total_limit", "1"],
        env=_slurm_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = out / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002"]  # save_total_limit 1
    assert len((out / "run" / "logs" / "metrics.jsonl").read_text().splitlines()) == 2
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (out / "hf" / "model.safetensors.index.json").is_file()


def test_train_sbatch_single_node(tiny_models, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), "examples/tiny_sft.yaml", "--model.hf",
         str(tiny_models["llama"]), "--train.train_iters", "1", "--train.lr_warmup_iters", "0",
         "--checkpoint.output_dir", str(run),
         "--checkpoint.save", str(run / "ckpt")],
        env=_slurm_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run / "ckpt" / "latest").read_text().strip() == "iter_0000001"
