"""Loading a checkpoint never runs code from it.

Checkpoint directories travel between users and clusters, and a pickle can execute anything when it
is loaded. Two kinds of pickle are read when a checkpoint is loaded:

- files we write with `torch.save` (every rank's RNG states): read with `torch.load(weights_only=True)`,
  torch's restricted unpickler (tensors, containers and primitive types only);
- torch.distributed.checkpoint's `.metadata`, which torch reads with plain `pickle.load` (megatron-core's
  `dist_checkpointing.load` goes through it): checked first by `check_distcp_metadata`, which unpickles it
  with an allowlist of the classes torch's own metadata consists of and refuses anything else.
  (megatron-core's `common.pt` is read by `torch.load` with torch's default, `weights_only=True`.)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from megatron_swift.checkpoint.hf import CheckpointError

# What torch.distributed.checkpoint's metadata pickles hold (torch 2.6 - 2.13): its dataclasses and enums,
# torch.Size, dtypes, and the layout / memory-format lookups.
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES and not name.startswith("__"):
            found = super().find_class(module, name)
            if isinstance(found, type) or name == "_MEM_FORMAT_ENCODING":  # classes / enums, not functions
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _OTHER_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a torch distributed-checkpoint metadata file")


def check_distcp_metadata(checkpoint_dir: str | Path) -> None:
    """Refuse a distributed checkpoint whose `.metadata` holds anything but torch's metadata classes."""
    metadata = Path(checkpoint_dir) / ".metadata"
    if not metadata.is_file():
        raise CheckpointError(f"{metadata}: missing; {Path(checkpoint_dir)} is not a complete distributed checkpoint")
    try:
        with metadata.open("rb") as stream:
            _MetadataUnpickler(stream).load()
    except Exception as exc:  # a crafted or damaged file: never hand it to pickle.load
        raise CheckpointError(
            f"{metadata}: refused to load ({exc}); it is not a metadata file torch wrote, so loading it could run "
            "code from it. Use a checkpoint from a trusted source"
        ) from None


def load_tensor_file(path: Path):
    """A file written with `torch.save` holding tensors, containers and primitives only (weights_only)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise CheckpointError(
            f"{path}: refused to load ({reason}); a checkpoint file here holds tensors and plain values only"
        ) from None
