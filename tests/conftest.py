"""Shared fixtures: tiny HF models of every family (made once per session) and a world-size-1 runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family name -> directory of a tiny random fp32 HF model with tokenizer."""
    from megatron_swift.models import all_families
    from megatron_swift.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(name, root / name, seed=i) for i, name in enumerate(sorted(all_families()))}


@pytest.fixture(scope="session")
def converted(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """family name -> megatron-core checkpoint converted at TP1 from the tiny model."""
    from converters.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("mcore")
    return {name: hf_to_mcore(path, root / name) for name, path in tiny_models.items()}
