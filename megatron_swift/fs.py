"""Durable file-system helpers: flush files and directory entries before a rename publishes them."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, recursive: bool = True) -> None:
    """fsync every file and directory under `root`, then `root` itself (already-clean files cost nothing)."""
    if recursive:
        for path in sorted(Path(root).rglob("*"), reverse=True):
            fsync_path(path)
    fsync_path(Path(root))
