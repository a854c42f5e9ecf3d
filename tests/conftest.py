"""Shared fixtures: tiny HF models of every family (made once per session) and a world-size-1 runtime."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every CPU run of the suite (and the processes it starts) checks that our collectives get tensors a CUDA run
# has on the GPU (megatron_swift/compat/device_audit.py): the class of bug that only NCCL would show.
os.environ.setdefault("MSWIFT_DEVICE_AUDIT", "1")
# One OpenMP thread for the suite and every process it starts (ranks, CLIs): the tiny models' matmuls gain nothing
# from two, and two threads spin-wait whenever anything else runs on a 2-core machine (a tiny training case
# measured 5x slower). Workers of megatron_swift.distributed.spawn apply it to the torch they inherit.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family name -> directory of a tiny random fp32 HF model with tokenizer."""
    from megatron_swift.models import all_families
    from megatron_swift.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(name, root / name, seed=_family_seed(name)) for name in sorted(all_families())}


# Each family's tiny model keeps its seed when families are added: a seed from the family's position in the
# sorted list moved every later family's weights (adding deepseek_v3 re-seeded llama), and with them the last
# bits of every test that compares runs, not the claims they check. A new family gets a seed here.
_FAMILY_SEEDS = {
    **{name: i for i, name in enumerate(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"))},
    "deepseek_v3": 0,
    "glm4_moe": 1,
    "gemma3": 2,
    "gpt_oss": 3,
    "qwen2_5_vl": 4,
    "qwen3_vl": 5,
}


def _family_seed(name: str) -> int:
    return _FAMILY_SEEDS.get(name, zlib.crc32(name.encode()))


@pytest.fixture(scope="session")
def vlm_sft_data(tmp_path_factory) -> Path:
    """A small image-SFT jsonl (tests/vlm_data.py) for vision-language training tests."""
    from tests.vlm_data import write_image_rows

    return write_image_rows(tmp_path_factory.mktemp("vlm_data"))


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
