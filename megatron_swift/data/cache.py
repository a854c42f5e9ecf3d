"""Cache of tokenized samples, keyed by (input files, tokenizer, template, arguments).

Files are identified by path, size and modification time (not content: hashing a corpus costs as
much as tokenizing it); the tokenizer by its serialized vocabulary, merges, special tokens and chat
template. A cache file is written to a temporary path and renamed, so a crash or a concurrent
writer (every data-parallel rank builds the same data) never leaves a damaged entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from megatron_swift.data.encode import Sample
from megatron_swift.data.sources import DatasetSpec


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def cache_key(specs: list[str], tokenizer, template_name: str, args: dict) -> str:
    files = []
    for spec in specs:
        for file in _files_of(DatasetSpec.parse(spec).path):
            stat = file.stat()
            files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    tokenizer_id = hashlib.sha256(
        (tokenizer.backend_tokenizer.to_str() + str(getattr(tokenizer, "chat_template", None))).encode()
    ).hexdigest()
    described = json.dumps([specs, files, tokenizer_id, template_name, args], sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:32]


class SampleCache:
    def __init__(self, directory: str | Path, key: str):
        self.path = Path(directory) / f"samples-{key}.npz"

    def load(self) -> tuple[list[Sample], dict] | None:
        if not self.path.is_file():
            return None
        with np.load(self.path) as stored:
            bounds = np.cumsum(stored["lengths"])[:-1]
            ids, weights = np.split(stored["ids"], bounds), np.split(stored["weights"], bounds)
            info = json.loads(str(stored["info"]))
        return [Sample(i, w) for i, w in zip(ids, weights, strict=True)], info

    def save(self, samples: list[Sample], info: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".tmp{os.getpid()}.npz")
        try:
            np.savez(temporary, lengths=np.array([len(s.ids) for s in samples], dtype=np.int64),
                     ids=np.concatenate([s.ids for s in samples]), weights=np.concatenate([s.weights for s in samples]),
                     info=np.array(json.dumps(info)))  # fmt: skip
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
