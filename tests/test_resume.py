"""Resume: 9 steps straight == a run killed (kill -9) past a checkpoint and resumed (bitwise on CPU, dropout on);
the history holds each step once; an interrupted save is cleaned up. Preemption signals: tests/test_slurm.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sft_sample.jsonl"


# Dropout draws from the RNG states a checkpoint holds: a resume that did not restore them would differ.
DROPOUT = ["--model.attention_dropout", "0.1", "--model.hidden_dropout", "0.1"]


def _launch(hf: Path, out: Path, iters: int, interval: int) -> subprocess.Popen:
    # The schedule's length is fixed (lr_decay_iters) so that a run of any length trains the same steps.
    args = [
        sys.executable, str(ROOT / "launch" / "pretrain_sft.py"), "--model.hf", str(hf), "--data.dataset", str(DATA),
        "--data.seq_length", "32", "--train.global_batch_size", "4", "--train.train_iters", str(iters),
        "--train.lr_decay_iters", "9", "--train.lr", "1e-3", "--checkpoint.output_dir", str(out),
        "--checkpoint.save", str(out / "ckpt"), "--checkpoint.save_interval", str(interval), *DROPOUT,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _history(out: Path) -> tuple[list[int], list[float]]:
    """The steps and losses in metrics.jsonl, in order, as written."""
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows], [row["loss"] for row in rows]


def _tensorboard_losses(out: Path) -> dict[int, list[float]]:
    """step -> the loss values TensorBoard shows (its reader applies the purge a resumed run records)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    found: dict[int, list[float]] = {}
    for event in events.Scalars("train/loss"):
        found.setdefault(event.step, []).append(event.value)
    return found


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
    """9 steps straight == a run killed (kill -9) after a step past its step-3 checkpoint, then resumed to 9:
    bitwise, and its history (metrics.jsonl, TensorBoard) holds each step once, the resumed run's."""
    hf = tiny_models["llama"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Side by side: one thread each on two cores.
    straight_run = _launch(hf, straight, iters=9, interval=9)
    victim = _launch(hf, resumed, iters=100, interval=3)
    latest, metrics = resumed / "ckpt" / "latest", resumed / "logs" / "metrics.jsonl"
    deadline = time.time() + 240

    def logged_past_latest() -> bool:  # a step logged after the checkpoint the resume will start from
        saved = latest.read_text().strip() if latest.is_file() else ""
        return saved in ("iter_0000003", "iter_0000006") and len(metrics.read_text().splitlines()) > int(saved[5:])

    while not logged_past_latest():
        assert victim.poll() is None and time.time() < deadline, "the run ended before a step past a checkpoint"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_steps, _ = _history(resumed)
    resumed_from = int(latest.read_text().strip()[5:])
    assert killed_steps[-1] > resumed_from

    # A save interrupted by a kill leaves a temporary directory: the next start removes it.
    leftover = resumed / "ckpt" / ".iter_0000099.tmp" / "model_optim"
    leftover.mkdir(parents=True)
    _finish(_launch(hf, resumed, iters=9, interval=3))
    assert not leftover.parent.exists()
    _finish(straight_run)

    expected_steps, expected = _history(straight)
    got_steps, got = _history(resumed)
    assert expected_steps == got_steps == list(range(1, 10))  # each step once
    assert got == expected  # bitwise, no tolerance
    board = _tensorboard_losses(resumed)
    assert sorted(board) == list(range(1, 10)) and all(len(values) == 1 for values in board.values()), board
    assert [board[step][0] for step in range(1, 10)] == pytest.approx(expected, rel=1e-6)  # float32 events
    final_straight = _model_tensors(straight / "ckpt" / "iter_0000009")
    final_resumed = _model_tensors(resumed / "ckpt" / "iter_0000009")
    assert final_straight and sorted(final_straight) == sorted(final_resumed)
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name
