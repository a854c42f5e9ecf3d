"""Device audit (CPU runs, `MSWIFT_DEVICE_AUDIT=1`): our collectives must get tensors a CUDA run puts on the GPU.

Why: on GPU every megatron-core process group but its `*_gloo` ones is NCCL-only, and a CPU tensor handed to an
NCCL collective fails (`No backend type associated with device type cpu`). On CPU everything is a CPU tensor
and gloo takes it, so the bug cannot show. In this mode:
- `comm_device()` (distributed/runtime.py) answers `cuda`, as on GPU; the CPU shims' device redirect places
  the tensor on the CPU and records it as "on the device" (`note_on_device`), as it does for `.cuda()` and
  `.to("cuda")`;
- every tensor collective called from megatron_swift's own code (megatron-core's are megatron-core's) asserts
  that each tensor it gets was placed that way, naming the call site.
So a loss report built as `torch.zeros(2)` or moved with `.cpu()` before an all-reduce fails on CPU, exactly
where it would crash on GPU. Only for tests: the GPU path never enters it (the CPU shims refuse CUDA).
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

ENV = "MSWIFT_DEVICE_AUDIT"
# torch.distributed functions that move tensors (object collectives pick their device themselves).
AUDITED_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)
DEVICE_AUDIT_SYMBOLS = tuple(("torch.distributed", name) for name in AUDITED_COLLECTIVES)
_PACKAGE = Path(__file__).resolve().parents[1]
_COMPAT = Path(__file__).resolve().parent
# id(tensor) -> weak reference to it (a WeakSet would compare tensors with ==, which is elementwise).
_on_device: dict[int, weakref.ref] = {}
_installed = False


def audit_enabled() -> bool:
    return os.environ.get(ENV) == "1"


def note_on_device(result):
    """Record the tensor(s) the device redirect placed where a CUDA run puts them on the GPU."""
    if isinstance(result, torch.Tensor):
        key = id(result)
        _on_device[key] = weakref.ref(result, lambda _, key=key: _on_device.pop(key, None))
    elif isinstance(result, list | tuple):
        for item in result:
            note_on_device(item)
    return result


def _placed_on_device(tensor: torch.Tensor) -> bool:
    ref = _on_device.get(id(tensor))
    return ref is not None and ref() is tensor


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _our_call_site() -> str | None:
    """`file:line` of the caller when it is megatron_swift's code (outside compat/), else None."""
    frame = sys._getframe(2)
    path = Path(frame.f_code.co_filename).resolve()
    if path.is_relative_to(_PACKAGE) and not path.is_relative_to(_COMPAT):
        return f"{path.relative_to(_PACKAGE.parent)}:{frame.f_lineno}"
    return None


def _audited(name: str, collective):
    @functools.wraps(collective)
    def checked(*args, **kwargs):
        site = _our_call_site()
        if site is not None:
            for tensor in _tensors([*args, *kwargs.values()]):
                if not _placed_on_device(tensor):
                    raise AssertionError(
                        f"device audit: torch.distributed.{name} at {site} got a tensor not placed on comm_device(); "
                        "on GPU its NCCL group would refuse it (create it with device=comm_device() or move it there)"
                    )
        return collective(*args, **kwargs)

    return checked


def install_device_audit() -> None:
    """Wrap the tensor collectives (idempotent); called by the CPU shims when `MSWIFT_DEVICE_AUDIT=1`."""
    global _installed
    if _installed:
        return
    for name in AUDITED_COLLECTIVES:
        setattr(dist, name, _audited(name, getattr(dist, name)))
    _installed = True
