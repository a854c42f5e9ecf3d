"""Process-group and megatron-core parallel-state lifecycle.

`init_distributed` is the single entry point every program uses: it picks the backend (NCCL on
GPU, gloo on CPU, where it also installs the CPU shims), initialises torch.distributed from the
usual torchrun environment (or a private single-process group when there is none), then
megatron-core's parallel state from a ParallelConfig, and seeds the model-parallel RNG tracker.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_swift.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _world_from_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(parallel: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30) -> DistributedContext:
    """Initialise torch.distributed and megatron-core model-parallel groups for `parallel`."""
    from megatron.core import parallel_state, tensor_parallel

    rank, world_size, local_rank = _world_from_env()
    problems = parallel.problems(world_size)
    if problems:
        raise ConfigError("invalid parallel layout:\n  " + "\n  ".join(problems))

    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_swift.compat import apply_cpu_shims

        apply_cpu_shims()
        backend = "gloo"
        device = torch.device("cpu")

    if not dist.is_initialized():
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # A new run in this process (cases of one test launch keep the process group): no MoE tracker entries sized
    # by the previous model's layers (see destroy_distributed).
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistributedContext(rank, world_size, local_rank, device, backend)


def comm_device() -> torch.device:
    """Where tensors handed to collectives live: this rank's GPU (megatron's NCCL groups take nothing else), else
    the CPU (gloo). Under the device audit a CPU run answers `cuda` as a GPU run does (the CPU shims then place
    the tensor on the CPU and record it; see compat/device_audit.py)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    from megatron_swift.compat.device_audit import audit_enabled

    return torch.device("cuda") if audit_enabled() else torch.device("cpu")


def on_rank_zero_agreed(action) -> None:
    """Run `action()` on global rank 0 only; if it raises, rank 0 raises that and every other rank a ConfigError
    with its message, so no rank is left to fail later in a collective with a misleading error.

    For what one process does for the whole job (take the save directory's lock, say)."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    failure, message = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            action()
        except Exception as exc:
            failure, message = exc, f"{type(exc).__name__}: {exc}"
    if multi:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise ConfigError(f"rank 0 stopped the job: {message}")


def destroy_distributed() -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    # megatron-core's MoE routers log their auxiliary losses into a process-global tracker sized by the
    # first model's layer count; the next run in this process (tests, benchmarks) may have more layers.
    get_moe_layer_wise_logging_tracker().clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    # The finished run's model, optimizer and DDP buffers hold its process groups in reference cycles; until
    # the cyclic collector runs, each group keeps its gloo threads (measured: 17 of a run's 18 tcp-loop threads
    # freed by this collect). A process that runs several jobs (tests, benchmarks) would pile them up.
    gc.collect()
    if not torch.cuda.is_available():
        from megatron_swift.compat import leave_device_redirect

        leave_device_redirect()  # init_distributed enters it again
