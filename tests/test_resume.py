"""Resume: 6 steps straight == 3 steps, kill -9, resume to 6 (bitwise on CPU); an interrupted save is harmless."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sft_sample.jsonl"


# Dropout draws from the RNG states a checkpoint holds: a resume that did not restore them would differ.
DROPOUT = ["--model.attention_dropout", "0.1", "--model.hidden_dropout", "0.1"]


def _launch(hf: Path, out: Path, iters: int, interval: int) -> subprocess.Popen:
    args = [
        sys.executable, str(ROOT / "launch" / "pretrain_sft.py"), "--model.hf", str(hf), "--data.dataset", str(DATA),
        "--data.seq_length", "32", "--train.global_batch_size", "4", "--train.train_iters", str(iters),
        "--train.lr", "1e-3", "--checkpoint.output_dir", str(out), "--checkpoint.save", str(out / "ckpt"),
        "--checkpoint.save_interval", str(interval), *DROPOUT,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _losses(out: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after resume) keeps its last value."""
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from megatron.core.dist_checkpointing import load_plain_tensors

    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig())
    try:
        tensors = load_plain_tensors(str(ckpt / "model_optim"))
    finally:
        destroy_distributed()
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer") and isinstance(v, torch.Tensor)}


def test_kill_and_resume_is_bitwise_identical(tiny_models, tmp_path):
    hf = tiny_models["llama"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _finish(_launch(hf, straight, iters=6, interval=6))

    victim = _launch(hf, resumed, iters=6, interval=3)
    latest = resumed / "ckpt" / "latest"
    deadline = time.time() + 240
    while not (latest.is_file() and latest.read_text().strip() == "iter_0000003"):
        assert victim.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert latest.read_text().strip() == "iter_0000003"

    # A save interrupted by a kill leaves a temporary directory; resume ignores it and replaces it.
    (resumed / "ckpt" / ".iter_0000006.tmp" / "model_optim").mkdir(parents=True, exist_ok=True)
    _finish(_launch(hf, resumed, iters=6, interval=3))

    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in range(1, 7)] == [expected[s] for s in range(1, 7)]  # bitwise, no tolerance
    final_straight = _model_tensors(straight / "ckpt" / "iter_0000006")
    final_resumed = _model_tensors(resumed / "ckpt" / "iter_0000006")
    assert final_straight and sorted(final_straight) == sorted(final_resumed)
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_models, tmp_path):
    out = tmp_path / "run"
    proc = _launch(tiny_models["llama"], out, iters=500, interval=1000)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended early"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _finish(proc)
    steps = len(metrics.read_text().splitlines())
    assert 2 <= steps < 500
    assert (out / "ckpt" / "latest").read_text().strip() == f"iter_{steps:07d}"
    assert json.loads((out / "ckpt" / f"iter_{steps:07d}" / "train_state.json").read_text())["iteration"] == steps
