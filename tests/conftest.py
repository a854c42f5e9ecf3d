"""Shared fixtures: tiny HF models of every family (made once per session) and a world-size-1 runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every CPU run of the suite (and the processes it starts) checks that our collectives get tensors a CUDA run
# has on the GPU (megatron_swift/compat/device_audit.py): the class of bug that only NCCL would show.
os.environ.setdefault("MSWIFT_DEVICE_AUDIT", "1")


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


@pytest.fixture(scope="module")
def llama_world(tiny_models, tmp_path_factory):
    """(model chunks, model args) of the tiny Llama built as training builds it, in a world of size 1."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from tests.train_matrix import job_for

    job = job_for(str(tiny_models["llama"]), "unused.jsonl", str(tmp_path_factory.mktemp("out")), {}, {})
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        yield build_model(job, args), args
    finally:
        destroy_distributed()
