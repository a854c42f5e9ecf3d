"""Processes of multi-rank work: run_workers' workers see the caller's environment at each launch (they fork from
a server started at the first launch, whose own environment is frozen then) and report their errors; a run in
this process leaves no process groups (nor their threads) behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_swift.distributed import WorkerError, run_workers

DATA = str(Path(__file__).resolve().parents[1] / "examples" / "data" / "sft_sample.jsonl")


def _rank_and_env(name: str) -> tuple[int, str | None]:
    return int(os.environ["RANK"]), os.environ.get(name)


def _fail_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one refuses")


def test_workers_see_the_environment_of_each_launch_and_report_errors(monkeypatch):
    assert run_workers(_rank_and_env, 2, "MSWIFT_SPAWN_PROBE") == [(0, None), (1, None)]  # starts the server
    monkeypatch.setenv("MSWIFT_SPAWN_PROBE", "set after the first launch")
    assert run_workers(_rank_and_env, 2, "MSWIFT_SPAWN_PROBE") == [(r, "set after the first launch") for r in (0, 1)]
    monkeypatch.delenv("MSWIFT_SPAWN_PROBE")
    assert run_workers(_rank_and_env, 2, "MSWIFT_SPAWN_PROBE") == [(0, None), (1, None)]
    with pytest.raises(WorkerError, match="rank 1: ValueError: rank one refuses"):
        run_workers(_fail_on_rank_one, 2)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def test_each_worker_runs_the_threads_omp_num_threads_says(monkeypatch):
    """Ranks fork from a server whose torch was imported at the first launch: each must still run the threads
    OMP_NUM_THREADS says at its own launch (1 when unset, as under torchrun), not the count it inherits (two
    ranks of two threads on 2 cores spin-wait on each other)."""
    for threads in (2, 1):
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        assert run_workers(_threads, 2) == [threads, threads]


def _gloo_threads() -> int:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return sum(1 for task in tasks.iterdir() if (task / "comm").read_text().strip() == "gloo_tcp_loop")


def test_runs_in_this_process_do_not_pile_up_process_group_threads(tiny_models, tmp_path):
    from tests.train_matrix import losses_for_cases

    before = _gloo_threads()
    for run in range(3):
        losses_for_cases([(str(tiny_models["llama"]), {}, {})], DATA, str(tmp_path / f"run{run}"))
    # A run creates ~18 gloo groups (megatron's TP / PP / DP / ... groups), each with a tcp-loop thread; measured:
    # 3 left after the first run and 1 more after each next (held outside Python), 17-19 each without the collect.
    assert _gloo_threads() - before <= 6
    # Three cases of one launch: each re-initialises without destroying the previous one's groups, which must
    # stay collectable (frozen with the heap at the next initialisation, they were never freed).
    before = _gloo_threads()
    llama = str(tiny_models["llama"])
    losses_for_cases([(llama, {}, {}), (llama, {}, {}), (llama, {}, {})], DATA, str(tmp_path / "cases"))
    assert _gloo_threads() - before <= 6
