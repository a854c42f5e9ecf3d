"""Where rows come from: local files and `datasets` dirs, `path#N` mixing, deterministic split.

Supported inputs: JSONL (one object per line), JSON (a list of objects), Parquet, CSV, and
directories written by `datasets.Dataset.save_to_disk`. Every row carries its location
(`file:line` for JSONL/CSV, `file:record` otherwise) so later stages can name it in errors.
`path#N` takes N rows from that dataset (repeating it when N exceeds its size), like ms-swift.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_swift.data.errors import BadRows, DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Row:
    where: str  # "file:line" (JSONL, CSV) or "file:record" (JSON, Parquet, datasets dir), 1-based
    data: dict


@dataclass(frozen=True)
class DatasetSpec:
    path: Path
    count: int | None  # rows to take (None: all of them)

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        match = re.fullmatch(r"(.+?)(?:#(\d+))?", spec.strip())
        path, count = match.group(1), match.group(2)
        if count is not None and int(count) < 1:
            raise DataError(f"{spec}: the count after '#' must be >= 1")
        return cls(Path(path), int(count) if count else None)


def check_exists(path: Path) -> None:
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise DataError(f"{path}: a directory must be a `datasets` save_to_disk directory")
    elif not path.is_file():
        raise DataError(f"{path}: no such file")
    elif path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def iter_rows(path: Path, bad: BadRows) -> Iterator[Row]:
    """Rows of one file or datasets dir, lazily for JSONL, CSV and Parquet (streaming reads them this way)."""
    check_exists(path)
    if path.is_dir():
        from datasets import load_from_disk

        for number, data in enumerate(load_from_disk(str(path)), start=1):
            yield Row(f"{path}:{number}", dict(data))
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad.report(f"{path}:{number}", f"invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(data, dict):
                    bad.report(f"{path}:{number}", "expected a JSON object per line")
                    continue
                yield Row(f"{path}:{number}", data)
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects (or use .jsonl)")
        for number, data in enumerate(records, start=1):
            if not isinstance(data, dict):
                bad.report(f"{path}:{number}", "expected an object in the list")
                continue
            yield Row(f"{path}:{number}", data)
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for data in reader:
                yield Row(f"{path}:{reader.line_num}", dict(data))
    else:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for data in batch.to_pylist():
                number += 1
                yield Row(f"{path}:{number}", data)


def read_jsonl(path: str | Path, bad: BadRows | None = None) -> list[tuple[int, dict]]:
    """(line or record number, row) for every row of one file, all read first; a bad row goes to `bad`
    (by default: raises DataError)."""
    bad = bad if bad is not None else BadRows()
    rows = [(int(row.where.rsplit(":", 1)[1]), row.data) for row in iter_rows(Path(path), bad)]
    if not rows:
        raise DataError(f"{path}: no rows" + (f" ({bad.count} bad)" if bad.count else ""))
    return rows


def _take(rows: list[Row], count: int, seed: int) -> list[Row]:
    """`count` rows: whole copies of the dataset, then a seeded random subset for the remainder."""
    repeats, remainder = divmod(count, len(rows))
    picked = np.random.default_rng(seed).permutation(len(rows))[:remainder]
    return rows * repeats + [rows[i] for i in sorted(picked)]


def load_rows(specs: list[str], seed: int, bad: BadRows) -> list[Row]:
    """All rows of the mixture, dataset after dataset (shuffling happens when batches are drawn)."""
    if not specs:
        raise DataError("data.dataset: no dataset given")
    parsed = [DatasetSpec.parse(spec) for spec in specs]
    for spec in parsed:  # every path is checked before any is read
        check_exists(spec.path)
    mixed: list[Row] = []
    for index, spec in enumerate(parsed):
        rows = list(iter_rows(spec.path, bad))
        if not rows:
            raise DataError(f"{spec.path}: no rows")
        mixed += rows if spec.count is None else _take(rows, spec.count, seed + index)
    return mixed


def split_rows(rows: list, ratio: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `ratio` of the rows (at least one when ratio > 0) is held out."""
    if ratio <= 0:
        return rows, []
    held = max(1, math.floor(len(rows) * ratio))
    if held >= len(rows):
        raise DataError(f"data.split_dataset_ratio={ratio} leaves no training rows out of {len(rows)}")
    order = np.random.default_rng(seed).permutation(len(rows))
    validation = set(order[:held].tolist())
    return [r for i, r in enumerate(rows) if i not in validation], [rows[i] for i in sorted(validation)]
