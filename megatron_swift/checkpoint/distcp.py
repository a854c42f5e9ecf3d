"""Reading regions of tensors out of a torch_dist (torch.distributed.checkpoint) directory, no model needed.

megatron-core saves every model tensor under its sharded key at its global shape, whatever layout it
was saved from: layers and experts stacked along leading axes, tensor-parallel pieces as chunks of the
global tensor. `DistcpReader.read(key, offsets, sizes)` assembles one region of one such tensor from
exactly the stored chunks that overlap it and reads nothing else: one layer's weight out of a stacked
tensor, or a TP-split weight whole from its pieces. torch's FileSystemReader does the file access and
the resharding arithmetic is torch's own (`create_read_items_for_chunk_list`), so the file format
(storage offsets, transforms) stays torch's business. One shortcut: a region that is exactly one stored
chunk (every tensor of a TP1 save, most of any save) is that chunk as torch.load returns it, without
the copy into a separate buffer FileSystemReader makes (half the memory, one pass over the bytes less).

No process group is needed: several processes can each read what they need from the same directory.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from megatron_swift.checkpoint.hf import CheckpointError


class _RegionPlanner:
    """What FileSystemReader.read_data asks of a load planner: where each read piece goes."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, item) -> torch.Tensor:
        region = self.dest
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths, strict=True)):
            region = region.narrow(dim, offset, length)
        return region

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:
        raise AssertionError("tensor regions never read byte objects")


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a file of their own: each stored chunk is a
    torch.save archive, which torch.load finds by seeking relative to the archive's start and end."""

    def __init__(self, file, offset: int, length: int):
        super().__init__()
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self.length - self.pos]
        self.file.seek(self.offset + self.pos)
        count = self.file.readinto(view)
        self.pos += count
        return count


class DistcpReader:
    """The tensors of one distributed checkpoint directory, read by region."""

    def __init__(self, checkpoint_dir: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        from megatron_swift.checkpoint.safety import check_distcp_metadata

        self.path = Path(checkpoint_dir)
        check_distcp_metadata(self.path)  # before torch unpickles it below
        self._reader = FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)
        self._chunk_sizes: dict[str, dict[tuple, tuple]] = {}  # key -> stored chunk offsets -> sizes

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Global shape of the tensor stored under `key`, or None when there is no such tensor."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        found = self.metadata.state_dict_metadata.get(key)
        return tuple(found.size) if isinstance(found, TensorStorageMetadata) else None

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of the tensor stored under `key`, as a new CPU tensor."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        stored = self.metadata.state_dict_metadata[key]
        whole = self._stored_chunk(key, tuple(offsets), tuple(sizes), stored.properties.dtype)
        if whole is not None:
            return whole
        dest = torch.empty(sizes, dtype=stored.properties.dtype, device="meta")  # allocated only when needed
        items = create_read_items_for_chunk_list(key, stored, [ChunkStorageMetadata(torch.Size(offsets), dest.shape)])
        covered = sum(item.lengths.numel() for item in items)
        if covered != dest.numel():  # a gap in the stored chunks: refuse rather than export uninitialised memory
            raise CheckpointError(f"{self.path}: {key} region {list(offsets)} + {list(sizes)} is only partly stored "
                                  f"({covered} of {dest.numel()} elements); the checkpoint is incomplete")  # fmt: skip
        dest = torch.empty_like(dest, device="cpu")
        try:
            self._reader.read_data(LoadPlan(items), _RegionPlanner(dest)).wait()
        except (OSError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: cannot read {key} ({type(exc).__name__}: {exc})") from None
        return dest

    def _stored_chunk(self, key: str, offsets: tuple, sizes: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """The region when it is exactly one stored, untransformed chunk, loaded as is; else None. The chunk is
        found by its offsets in a per-key index: torch's planner scans every chunk of the tensor for each read,
        quadratic in the chunks of a stacked tensor (a 256-expert layer: 256 reads of 256 chunks each)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if key not in self._chunk_sizes:
            chunks = self.metadata.state_dict_metadata[key].chunks
            self._chunk_sizes[key] = {tuple(chunk.offsets): tuple(chunk.sizes) for chunk in chunks}
        if self._chunk_sizes[key].get(offsets) != sizes:
            return None
        info = self.metadata.storage_data.get(MetadataIndex(key, offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        try:
            with open(self.path / info.relative_path, "rb") as file:
                tensor = torch.load(_FileSlice(file, info.offset, info.length), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{self.path}: cannot read {key} ({type(exc).__name__}: {exc})") from None
        if tuple(tensor.shape) != sizes or tensor.dtype != dtype:
            raise CheckpointError(f"{self.path / info.relative_path}: {key} holds {tensor.dtype} {list(tensor.shape)}, "
                                  f"the metadata says {dtype} {list(sizes)}")  # fmt: skip
        return tensor
