"""Preemption: a SIGTERM / SIGUSR1 to any process of a run ends it with a complete checkpoint and exit 0.

The signal reaches the ranks three ways, and each must end the same way:
- to the ranks alone (a user's `kill`, `scancel --signal=USR1`);
- to the launcher: torchrun forwards it to each rank's whole process group (`killpg`), which includes the
  processes a rank starts itself;
- to every process of the job step (Slurm's preemption and time limit, `scancel`).

`PreemptionFlag` turns the signal into a flag the ranks agree on after each step; the loop then saves and
returns. What a rank starts must survive the signal: megatron-core's checkpoint writer would otherwise
collect its results through a Manager process the forwarded SIGTERM kills
(megatron_swift/compat/checkpoint_writer.py). The writer's forked workers inherit the rank's Python
handlers, so the signal only sets their copy of the flag.

torchrun itself exits 1 after forwarding a signal, whatever its workers did. `mark_clean_exit` lets a
wrapper (launch/torchrun.sh) tell a preemption whose every rank saved and exited 0 from a failure. torchrun can
also end before its ranks: a second signal while it waits for them (Slurm signals every process of the step and
the wrapper forwards too) aborts its wait. `register_rank` leaves each rank's pid so the wrapper waits for the
ranks themselves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CLEAN_EXIT_DIR = "MSWIFT_CLEAN_EXIT_DIR"  # set by launch/torchrun.sh


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 while the training loop runs (a context manager: the previous handlers come
    back on exit); `agreed()` is the flag all ranks agree on (any rank signalled)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionFlag:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def register_rank() -> None:
    """Leave this rank's pid for the wrapper that started torchrun (launch/torchrun.sh), which waits for it to
    end before it reads the notes of `mark_clean_exit`; nothing without one."""
    _write_note("pid", f"{os.getpid()}\n")


def mark_clean_exit(detail: str) -> None:
    """Record that this rank ended cleanly (trained to the end or saved after a preemption signal), for the
    wrapper that started torchrun (launch/torchrun.sh); nothing without one."""
    _write_note("rank", f"local_world_size {os.environ.get('LOCAL_WORLD_SIZE', '1')}\n{detail}\n")


def _write_note(kind: str, text: str) -> None:
    directory = os.environ.get(CLEAN_EXIT_DIR)
    if not directory:
        return
    try:
        (Path(directory) / f"{kind}_{os.environ.get('RANK', '0')}").write_text(text)
    except FileNotFoundError:
        # The wrapper gave up waiting and removed its folder: its verdict is made, and this rank's own exit
        # status must not turn a clean end into a failure.
        print(f"mswift: {directory} is gone; the launcher no longer reads rank notes", flush=True)
