"""megatron-core's checkpoint writer without its Manager process (applied on every machine, GPU included).

Why: `FileSystemWriterAsync` (what `dist_checkpointing.save` writes with) hands its write results through
the queue `_get_write_results_queue()` returns: a `multiprocessing.Manager().Queue()`, cached in the module
global `_results_queue`, served by a spawned process. A preemption signal forwarded to a rank's process
group (torchrun does that) kills that server, and the next save dies with it (BrokenPipeError, a half-written
checkpoint, exit 1); starting it also stalls the first save (~6 s on 2 cores). Our saves are synchronous: the
rank's own process puts into and gets from the queue, so a `queue.Queue` is all it needs.
`CHECKPOINT_WRITER_SYMBOLS` lists what this touches; tests/test_compat.py checks it still exists upstream.
"""

from __future__ import annotations

import queue

CHECKPOINT_WRITER_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_get_write_results_queue"),
)


def keep_checkpoint_writer_in_process() -> None:
    """Give the writer an in-process results queue; once per process, before the first (synchronous) save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
