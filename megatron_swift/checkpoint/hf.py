"""HF checkpoint directories: validated lazy reading and streamed, sharded safetensors writing.

Reading validates everything cheap first (config, index, every shard's header and length), so a
missing, foreign or truncated checkpoint fails before any tensor is read. Tensors are then read
one at a time on demand. Writing streams tensors into shards of bounded size.

MXFP4 expert weights (gpt-oss as published: `X_blocks` + `X_scales`) are read the same way, as the dequantized
float32 `X` (checkpoint/mxfp4.py), and their `quantization_config` is dropped from what is written.

Block-scaled FP8 checkpoints (DeepSeek-V3 / R1 / Kimi-K2 as published: `quantization_config` fp8 with
`weight_block_size`, an F8_E4M3 `X.weight` next to its F32 `X.weight_scale_inv` per block) are read
dequantized: `X.weight` comes back as float32 `fp8 x scale` of its block (what DeepSeek's own
`weight_dequant` computes), the scale tensors are consumed by it, and the checkpoint's dtype is that of its
other tensors (bf16), which is what a conversion or training run then holds. Directories this module writes
never hold FP8 or MXFP4, so their config.json loses the `quantization_config`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_swift.checkpoint.mxfp4 import BLOCKS, SCALES, dequantize, dequantized_shape, is_mxfp4
from megatron_swift.models.mapping import renamed_prefix, stacked_name

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "MXFP4": 1,  # dequantized view of half a byte per value plus a byte of scale per 32: progress counts ~ bytes
}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, foreign or damaged; the message says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path, with_data_start: bool = False):
    """Parse a safetensors header and check the file holds every byte the header promises; with
    `with_data_start`, (header, offset of the data section) (tensor offsets count from there)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header claims {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {expected}); re-copy or re-save it"
        )
    return (header, 8 + header_len) if with_data_start else header


FINGERPRINT_SAMPLE = 4096  # bytes of each tensor's data that go into a weights fingerprint


def sampled_fingerprint(files: list[Path], hash_file) -> str:
    """sha256 over the sorted file names and what `hash_file(path, digest)` feeds in for each."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda f: f.name):
        digest.update(path.name.encode())
        hash_file(path, digest)
    return digest.hexdigest()


def weights_fingerprint(hf_dir: str | Path) -> str:
    """Identifies an HF model's weights cheaply: every tensor's name, dtype, shape and first 4 KiB of data.

    Fine-tuning changes every tensor's leading values, so another model's or another fine-tune's weights
    give another fingerprint; reading ~4 KiB per tensor costs milliseconds even for a 70B checkpoint.
    """

    def hash_safetensors(path: Path, digest) -> None:
        header, data_start = read_safetensors_header(path, with_data_start=True)
        with open(path, "rb") as handle:
            for name in sorted(header):
                info = header[name]
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
                digest.update(handle.read(min(end - begin, FINGERPRINT_SAMPLE)))

    return sampled_fingerprint(HFCheckpoint(hf_dir).weight_files(), hash_safetensors)


def load_hf_config(path: Path):
    """transformers' config object for an HF directory, or a CheckpointError naming the file."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers validates with many error types (strict dataclasses, rope checks)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{Path(path) / 'config.json'}: transformers cannot read it ({reason})") from None


class HFCheckpoint:
    """A validated HF model directory whose tensors are read lazily by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: not an HF model directory (no config.json)")
        try:
            self.config_dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        self.tensors = self._index_tensors()
        self._handles: dict[Path, object] = {}
        self._stored: dict[str, str] = {}  # name read as -> name in the file (`use_aliases`)

    def weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files
        if (self.path / SINGLE_NAME).is_file():
            return [self.path / SINGLE_NAME]
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))" if others else ""
        raise CheckpointError(f"{self.path}: no safetensors weights{hint}")

    def _index_tensors(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in self.weight_files():
            for name, info in read_safetensors_header(file).items():
                tensors[name] = TensorInfo(file, info["dtype"], tuple(info["shape"]))
        self.block_scales: dict[str, TensorInfo] = {}  # FP8 weight name -> its scale tensor
        block = _fp8_block_size(self.config_dict)
        for name, info in list(tensors.items()):
            scale = tensors.get(name + "_scale_inv")
            if scale is None or not info.dtype.startswith("F8_"):
                continue
            ok = block is not None and len(info.shape) == 2
            expected = tuple(-(-dim // size) for dim, size in zip(info.shape, block, strict=True)) if ok else None
            if not ok or scale.shape != expected:
                raise CheckpointError(
                    f"{self.path}: {name} is {info.dtype} with a scale of shape {list(scale.shape)}; only 2-D weights "
                    f"with one scale per quantization_config.weight_block_size block are read (expected "
                    f"{list(expected) if expected else 'a weight_block_size'})"
                )
            self.block_scales[name] = tensors.pop(name + "_scale_inv")
        self._block = block
        self.mxfp4: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # weight name -> its (blocks, scales)
        if is_mxfp4(self.config_dict):
            for name in [n for n in tensors if n.endswith(BLOCKS)]:
                weight = name.removesuffix(BLOCKS)
                blocks, scales = tensors[name], tensors.get(weight + SCALES)
                if scales is None or blocks.dtype != "U8" or len(blocks.shape) < 3 or scales.shape != blocks.shape[:-1]:
                    raise CheckpointError(
                        f"{self.path}: {name} ({blocks.dtype} {list(blocks.shape)}) has no matching U8 "
                        f"{weight}{SCALES} of its shape without the last dim: not an MXFP4 weight this reader knows"
                    )
                self.mxfp4[weight] = (tensors.pop(name), tensors.pop(weight + SCALES))
                tensors[weight] = TensorInfo(blocks.file, "MXFP4", dequantized_shape(blocks.shape))
        return tensors

    def use_aliases(self, aliases: tuple[tuple[str, str], ...]) -> None:
        """Read tensors stored under another HF layout's names by the names the rules use: each (stored prefix,
        rules' prefix) pair renames the tensors starting with the stored prefix (e.g. transformers 5's
        `model.language_model.layers.*` as the hub's `model.layers.*`). A checkpoint holding a tensor under both
        names is refused: which one the model should get is ambiguous."""
        for name in list(self.tensors):
            renamed = renamed_prefix(name, aliases)
            if renamed == name:
                continue
            if renamed in self.tensors:
                raise CheckpointError(f"{self.path}: holds both {name} and {renamed} (two layouts of one tensor)")
            self.tensors[renamed] = self.tensors.pop(name)
            self._stored[renamed] = name

    @property
    def config(self):
        return load_hf_config(self.path)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype most weights are stored in."""
        counts: dict[str, int] = {}
        for name, info in self.tensors.items():
            if name not in self.block_scales and name not in self.mxfp4:  # dequantized weights take the others' dtype
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        name = max(counts, key=counts.get)
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(name, torch.float32)

    def info(self, name: str) -> TensorInfo | None:
        """A tensor's file, dtype and shape; `NAME[i]` (models/mapping.py) is slice i of a stacked tensor."""
        base, index = stacked_name(name)
        info = self.tensors.get(base)
        if index is None or info is None:
            return info
        if not info.shape or index >= info.shape[0]:
            return None
        return TensorInfo(info.file, info.dtype, info.shape[1:])

    def get(self, name: str) -> torch.Tensor:
        base, index = stacked_name(name)
        if index is not None:
            if self.info(name) is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
            if base in self.mxfp4:
                blocks, scales = self.mxfp4[base]
                return dequantize(
                    *(self._read_slice(i.file, base + s, index) for i, s in ((blocks, BLOCKS), (scales, SCALES)))
                )
            return self._read_slice(self.tensors[base].file, base, index)
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if name in self.mxfp4:
            blocks, scales = self.mxfp4[name]
            return dequantize(self._read(blocks.file, name + BLOCKS), self._read(scales.file, name + SCALES))
        tensor = self._read(info.file, name)
        scale_info = self.block_scales.get(name)
        if scale_info is None:
            return tensor
        scale = self._read(scale_info.file, name + "_scale_inv").float()
        rows, cols = tensor.shape
        scale = scale.repeat_interleave(self._block[0], dim=0)[:rows].repeat_interleave(self._block[1], dim=1)[:, :cols]
        return tensor.float() * scale

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle

    def _read(self, file: Path, name: str) -> torch.Tensor:
        return self._handle(file).get_tensor(self._stored.get(name, name))

    def _read_slice(self, file: Path, name: str, index: int) -> torch.Tensor:
        return self._handle(file).get_slice(self._stored.get(name, name))[index : index + 1][0]

    def nbytes(self, names) -> int:
        """Stored size of the named tensors (or slices)."""
        infos = [self.info(n) for n in names]
        return sum(_DTYPE_BYTES.get(info.dtype, 4) * _numel(info.shape) for info in infos)


def _fp8_block_size(config: dict) -> tuple[int, int] | None:
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    return tuple(block) if quant.get("quant_method") == "fp8" and block else None


def copy_side_files(src_dir: Path, out_dir: Path) -> None:
    """Copy config, tokenizer and generation files (every file that is not a weight file); a block-FP8
    `quantization_config` is dropped: what is written next to them is dequantized."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(src_dir).iterdir():
        if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and item.name != INDEX_NAME:
            shutil.copy2(item, out_dir / item.name)
    config_file = out_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if _fp8_block_size(config) or is_mxfp4(config):
            del config["quantization_config"]
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ensure_generation_config(out_dir: Path) -> None:
    """Give an export whose source had no generation_config.json the one transformers derives from
    config.json (bos / eos / pad ids): vLLM takes its default stop tokens and sampling from that file."""
    if not (Path(out_dir) / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out_dir)).save_pretrained(out_dir)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class ShardedSafetensorsWriter:
    """Stream (name, tensor) pairs into `model-0000i-of-0000n.safetensors` shards + the HF index.

    At most one shard of tensors is held at a time.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 4 * 1024**3):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        path = self.out_dir / f"shard-{index}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i}.tmp", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
