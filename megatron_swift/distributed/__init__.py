"""Distributed runtime: process groups, megatron-core parallel state, local worker spawning."""

from megatron_swift.distributed.runtime import (
    DistributedContext,
    comm_device,
    destroy_distributed,
    init_distributed,
    on_rank_zero_agreed,
)
from megatron_swift.distributed.spawn import WorkerError, run_workers

__all__ = [
    "DistributedContext",
    "WorkerError",
    "comm_device",
    "destroy_distributed",
    "init_distributed",
    "on_rank_zero_agreed",
    "run_workers",
]
