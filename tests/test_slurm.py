"""The sbatch templates run unchanged as a single-node job (SLURM_NNODES=1), here on 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.mark.slow  # each step is covered by the default suite (test_cli, the preemption tests); this is the chain
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


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            _, err = proc.communicate()
            raise AssertionError(f"the job ended or hung before {what}:\n{err[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize(  # one signal path in the default suite, the other two in the slow suite (CI runs both)
    "target", ["launcher", *(pytest.param(t, marks=pytest.mark.slow) for t in ("every process", "ranks"))]
)
def test_preemption_signal_ends_with_a_complete_checkpoint_and_exit_zero(target, tiny_models, tmp_path):
    """train.sbatch on one node, 2 ranks, a checkpoint every 2 steps. SIGTERM after a checkpoint exists, to
    torchrun (a user's `kill`; torchrun forwards it to each rank's process group), to every process of the job
    (Slurm's preemption and time limit) or to the ranks alone: each rank finishes its step and saves, the job
    exits 0 well within Slurm's default KillWait (30 s), and `latest` holds the last step logged."""
    import psutil

    run = tmp_path / "run"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), "examples/tiny_sft.yaml", "--model.hf",
         str(tiny_models["llama"]), "--train.train_iters", "500", "--train.lr_warmup_iters", "0",
         "--checkpoint.output_dir", str(run), "--checkpoint.save", str(run / "ckpt"),
         "--checkpoint.save_interval", "2"],
        env=_slurm_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    ckpt, metrics = run / "ckpt", run / "logs" / "metrics.jsonl"
    try:
        # A checkpoint exists (what broke: the writer's state from the first save) and a step after it.
        _wait_until(lambda: (ckpt / "latest").is_file() and len(metrics.read_text().splitlines()) >= 3, proc,
                    "its first checkpoint")  # fmt: skip
        job = psutil.Process(proc.pid)
        (torchrun,) = [p for p in job.children(recursive=True) if any(a.endswith("torchrun") for a in p.cmdline())]
        ranks = torchrun.children()
        assert len(ranks) == 2
        targets = {"launcher": [torchrun], "every process": [job, *job.children(recursive=True)], "ranks": ranks}
        signalled = time.time()
        for process in targets[target]:
            process.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        took = time.time() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert took < 30, took
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 500
    last = f"iter_{len(steps):07d}"
    assert (ckpt / "latest").read_text().strip() == last
    assert json.loads((ckpt / last / "train_state.json").read_text())["iteration"] == len(steps)
    assert sorted(p.name for p in (ckpt / last / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_wrapper_waits_for_ranks_that_outlive_torchrun(tmp_path):
    """torchrun can exit before its ranks (a second SIGTERM aborts its wait for them: CI saw the wrapper remove
    its notes folder under ranks still saving). A stand-in torchrun starts one rank that saves for 2 s and exits
    1 once it has started, as an aborted torchrun does: the wrapper must wait for the rank, read its note and exit 0."""
    rank = (
        "import time; from megatron_swift.training import preemption as p; "
        "p.register_rank(); time.sleep(2); p.mark_clean_exit('saved')"
    )
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(  # exits once the rank has registered, as torchrun's abort comes long after the start
        f'#!/usr/bin/env bash\nRANK=0 LOCAL_WORLD_SIZE=1 {sys.executable} -c "{rank}" &\n'
        'until [ -e "$MSWIFT_CLEAN_EXIT_DIR/pid_0" ]; do sleep 0.1; done\nexit 1\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 1 ranks of this node saved and ended cleanly" in result.stdout
