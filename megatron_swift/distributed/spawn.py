"""Run a function on N local worker processes (CPU/gloo or one GPU each), torchrun-style.

Used by the converter CLI so `--tp 2` works without the user writing a torchrun line. Workers
get RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT exactly as torchrun would set them, so the
same code path (`init_distributed`) serves both.

Without a GPU, workers fork from a server process that imported torch, transformers, megatron-core and the
worker function's module once (multiprocessing's forkserver): a launch costs a fork per rank instead of those
imports in every rank (about 8 CPU-seconds each), which is most of a small multi-rank job. The server holds no
threads or process groups, so a fork of it is as clean as a fresh interpreter; each worker takes the caller's
environment as it is at the launch (the server's is the one it started with). With a GPU, workers are spawned:
an import that touches CUDA (Transformer Engine's, for one) would make every fork of the server unable to use it.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from megatron_swift.distributed.runtime import free_port

# Imported once by the fork server; a worker function's module is added at the server's start.
_SERVER_PRELOAD = ("torch", "transformers", "megatron.core")


class WorkerError(RuntimeError):
    """A worker process failed; the message is the worker's own error."""


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, payload: bytes, env: dict, queue) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The variable alone is read too late: torch (and its OpenMP pool) is already imported here, by the
    # forkserver's preload or the parent. Two ranks of two threads each on a 2-core machine spin-wait on each
    # other: a small matmul measured 30x slower than with one thread.
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        result = fn(*pickle.loads(payload))
    except BaseException as exc:  # report to the parent, which raises it once
        queue.put((local_rank, "error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    queue.put((local_rank, "ok", pickle.dumps(result)))


def _context(fn: Callable):
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    module = getattr(fn, "__module__", None)
    # Read only when the server starts (the first launch of this process); later functions' modules are
    # imported by the forked workers themselves.
    ctx.set_forkserver_preload([*_SERVER_PRELOAD, *([module] if module and module != "__main__" else [])])
    return ctx


def run_workers(fn: Callable, nprocs: int, *args) -> list:
    """Run `fn(*args)` on `nprocs` spawned processes; return their results ordered by rank.

    One process runs in the caller's process (no spawn, no re-import), as a world of size 1.
    """
    if nprocs == 1 and "WORLD_SIZE" not in os.environ:
        return [fn(*args)]
    ctx = _context(fn)
    queue = ctx.SimpleQueue()
    port = free_port()
    # Plain pickle bytes: torch's multiprocessing pickler would pass tensors through shared-memory
    # files that vanish when a worker exits before the parent reads its result.
    payload = pickle.dumps(args)
    procs = [
        ctx.Process(target=_worker, args=(rank, nprocs, port, fn, payload, dict(os.environ), queue), daemon=False)
        for rank in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, bytes] = {}
    errors: dict[int, str] = {}
    # Read results while workers run (a large result would block its sender on a full pipe); stop at the
    # first error, since the other ranks would wait forever in a collective with the failed one.
    while len(results) < nprocs and not errors:
        if not queue.empty():
            rank, status, data = queue.get()
            (results if status == "ok" else errors)[rank] = data
            continue
        crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
        if crashed and queue.empty():  # died without reporting (killed, segfault)
            errors.update({r: f"worker exited with code {procs[r].exitcode}" for r in crashed})
        else:
            time.sleep(0.02)
    for proc in procs:
        if errors and proc.is_alive():
            proc.terminate()
        proc.join()
    if errors:
        first = min(errors)
        raise WorkerError(f"rank {first}: {errors[first]}")
    return [pickle.loads(results[r]) for r in range(nprocs)]
