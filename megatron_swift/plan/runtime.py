"""The planner inside a training run: its own layout's estimate at start-up, and preflight's memory warning.

Both use this machine as the target (kernels and fusions resolved as the run resolves them) and, on a
GPU, its memory (`torch.cuda.get_device_properties`) and, when the device is in hardware.py's table, its
step-time model. A failure of the estimate is reported in its line, never raised: it must not stop a run
that preflight accepted.
"""

from __future__ import annotations

import os

from megatron_swift.plan.hardware import DEVICES, GIB, Cluster
from megatron_swift.plan.layout import Target
from megatron_swift.training.config import JobConfig


def device_memory() -> int | None:
    """This GPU's memory in bytes, None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory


def _cluster(world_size: int) -> Cluster | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    device = next((d for key, d in DEVICES.items() if key.split("-")[0] in name and "40gb" not in key), None)
    if device is None:
        return None
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return Cluster(device, gpus_per_node=per_node, nodes=max(world_size // per_node, 1))


def memory_warnings(job: JobConfig, world_size: int, model_args, device_bytes: int | None = None) -> list[str]:
    """A warning when the estimated peak of the busiest rank exceeds the device's memory (GPU runs only)."""
    from megatron_swift.plan.estimate import estimate

    device_bytes = device_bytes if device_bytes is not None else device_memory()
    if device_bytes is None:
        return []
    try:
        est = estimate(job, world_size, model_args, target=Target.this_machine(), with_time=False)
    except Exception as exc:  # an estimate that cannot be made is reported, not fatal to the run
        return [f"memory estimate unavailable ({type(exc).__name__}: {exc})"]
    worst = max(est.ranks, key=lambda r: r.total_bytes)
    if worst.total_bytes <= device_bytes:
        return []
    return [
        f"estimated peak memory {worst.total_bytes / GIB:.1f} GiB on rank {worst.rank} (pipeline stage "
        f"{worst.pp_stage}) exceeds the device's {device_bytes / GIB:.1f} GiB; mswift-plan --config ... --search "
        "lists layouts that fit"
    ]


def startup_summary(job: JobConfig, world_size: int, model_args) -> str:
    """One line: the estimate of this run's layout on this machine."""
    from megatron_swift.plan.estimate import estimate
    from megatron_swift.plan.report import startup_line

    try:
        cluster = _cluster(world_size)
        est = estimate(job, world_size, model_args, cluster, Target.this_machine())
    except Exception as exc:  # see module docstring
        return f"memory estimate (mswift-plan) unavailable: {type(exc).__name__}: {exc}"
    line = startup_line(est, device_memory())
    if est.time is not None:
        line += f"; step ~ {est.time.step_s:.2f} s, MFU ~ {100 * est.time.mfu:.0f}%"
    return line
