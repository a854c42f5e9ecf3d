"""HF safetensors shards laid out before any tensor exists, and written in place as tensors arrive.

An export knows every tensor's name, dtype and shape before it computes one (the family rules give the
shapes), so the whole output can be planned up front: which `model-0000i-of-0000n.safetensors` file
each tensor goes to, every file's header and every tensor's byte range, and the index. A writer then
puts each tensor at its offset the moment it is produced: nothing is held back to fill a shard, and
several processes can each write their own files with no coordination beyond the plan.

Within a file tensors are laid out in name order with safetensors' header format (compact JSON,
`__metadata__` first, padded with spaces to 8 bytes), which is what safetensors' own `save_file` writes
for tensors of one dtype: a shard written here is byte-identical to `save_file` of the same tensors.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_swift.checkpoint.hf import INDEX_NAME
from megatron_swift.models.mapping import stacked_name

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Linux writes at most 2 GiB - 4 KiB per call; larger tensors (a 235B model's embedding) take several.
_MAX_WRITE = 1 << 30


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its tensors in file order, its header, and where each tensor's bytes go."""

    file: str
    tensors: tuple[PlannedTensor, ...]
    header: bytes  # the 8-byte length and the padded JSON
    ranges: tuple[tuple[int, int], ...]  # absolute (begin, end) file offsets, parallel to `tensors`

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _layout(file: str, tensors: list[PlannedTensor]) -> ShardLayout:
    tensors = sorted(tensors, key=lambda t: t.name)
    if len({t.dtype for t in tensors}) > 1:
        # save_file puts wider dtypes first; one dtype per file keeps name order == save_file's order.
        raise ValueError(f"{file}: tensors of several dtypes in one shard")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{tensor.name}: dtype {tensor.dtype} has no safetensors name")
        header[tensor.name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}  # fmt: skip
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    ranges = tuple((start + spec["data_offsets"][0], start + spec["data_offsets"][1])
                   for name, spec in header.items() if name != "__metadata__")  # fmt: skip
    return ShardLayout(file, tuple(tensors), len(text).to_bytes(8, "little") + text, ranges)


def plan_shards(groups: list[list[PlannedTensor]], max_shard_bytes: int) -> list[ShardLayout]:
    """Pack groups of tensors, in order, into files of at most `max_shard_bytes` (a group larger than that
    gets a file of its own). A group (the tensors one rule produces, e.g. q/k/v) is never split across
    files, so whoever writes a file computes each of its tensors from one read of the sources."""
    packed: list[list[PlannedTensor]] = []
    size = 0
    for group in groups:
        group_bytes = sum(t.nbytes for t in group)
        if not packed or (packed[-1] and size + group_bytes > max_shard_bytes):
            packed.append([])
            size = 0
        packed[-1].extend(group)
        size += group_bytes
    names = [t.name for files in packed for t in files]
    if len(names) != len(set(names)):
        raise ValueError(f"tensor names planned twice: {sorted({n for n in names if names.count(n) > 1})}")
    count = len(packed)
    return [_layout(f"model-{i + 1:05d}-of-{count:05d}.safetensors", files) for i, files in enumerate(packed)]


def write_index(out_dir: Path, layouts: list[ShardLayout]) -> None:
    """`model.safetensors.index.json` for the planned files (as transformers' save_pretrained writes it)."""
    weight_map = {t.name: layout.file for layout in layouts for t in layout.tensors}
    index = {"metadata": {"total_size": sum(layout.nbytes for layout in layouts)},
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


class ShardFileWriter:
    """Writes one planned file: the header at once, then each tensor at its offset as it arrives.

    `close` refuses a file with a tensor missing (its bytes would silently read as zeros)."""

    def __init__(self, out_dir: Path, layout: ShardLayout):
        if sys.byteorder != "little":  # safetensors is little-endian; raw tensor bytes are written as they are
            raise RuntimeError("writing safetensors needs a little-endian machine")
        self.path = Path(out_dir) / layout.file
        self.layout = layout
        self._where = {t.name: (t, span) for t, span in zip(layout.tensors, layout.ranges, strict=True)}
        self._written: set[str] = set()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, memoryview(layout.header), 0)
            end = layout.ranges[-1][1] if layout.ranges else len(layout.header)
            os.ftruncate(self._fd, end)  # full size now: tensors land anywhere, in any order
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a planned tensor, or slice i of one (`NAME[i]`, models/mapping.py) at its offset."""
        base, index = stacked_name(name)
        if base not in self._where:
            raise KeyError(f"{self.path}: {base} is not planned for this file")
        if name in self._written or base in self._written:
            raise ValueError(f"{self.path}: {name} written twice")
        planned, (begin, end) = self._where[base]
        shape = planned.shape
        if index is not None:
            if not shape or index >= shape[0]:
                raise KeyError(f"{self.path}: {name} is outside the planned {list(shape)}")
            shape = shape[1:]
            begin, end = (
                begin + index * (end - begin) // planned.shape[0],
                begin + (index + 1) * (end - begin) // planned.shape[0],
            )
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: {name} is {tensor.dtype} {list(tensor.shape)}, planned "
                             f"{planned.dtype} {list(shape)}")  # fmt: skip
        if end > begin:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self._fd, memoryview(data), begin)
        self._written.add(name)

    def __enter__(self) -> ShardFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)  # the caller's error stands; the half file goes with the temporary output dir

    def close(self) -> None:
        os.close(self._fd)
        for base, (planned, _) in self._where.items():  # a stacked tensor is written when all its slices are
            if base not in self._written and planned.shape and planned.shape[0] and all(f"{base}[{i}]" in self._written
                                                                   for i in range(planned.shape[0])):  # fmt: skip
                self._written.add(base)
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} planned tensor(s) never written: {', '.join(missing[:5])}")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _MAX_WRITE], offset + done)
