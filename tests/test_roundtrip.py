"""Acceptance: HF -> megatron-core -> HF is bit-exact for every family (keys, tensors, config)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.models import all_families
from megatron_swift.models.tiny import make_tiny_model


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _config(path: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).to_dict()
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)  # where it was loaded from
    return config


def assert_bit_exact(original: Path, exported: Path) -> None:
    before, after = _hf_tensors(original), _hf_tensors(exported)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name
    assert _config(exported) == _config(original)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    for side_file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / side_file).read_bytes() == (original / side_file).read_bytes()


@pytest.mark.parametrize("family", sorted(all_families()))
def test_round_trip_is_bit_exact(family, tiny_models, converted, tmp_path):
    exported = mcore_to_hf(converted[family], tmp_path / "hf")
    assert_bit_exact(tiny_models[family], exported)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("qwen2", {"tie_word_embeddings": False}),
        ("qwen3", {"tie_word_embeddings": False}),
        ("gemma3", {}),
        ("gpt_oss", {}),
        ("qwen2_5_vl", {"tie_word_embeddings": True}),  # as Qwen2.5-VL-3B
    ],
)
def test_round_trip_variants_bf16(family, overrides, tmp_path):
    source = make_tiny_model(family, tmp_path / "src", seed=7, dtype=torch.bfloat16, **overrides)
    mcore = hf_to_mcore(source, tmp_path / "mcore")
    assert json.loads((mcore / "mswift_meta.json").read_text())["dtype"] == "bf16"
    assert_bit_exact(source, mcore_to_hf(mcore, tmp_path / "hf"))


def test_dtype_change_on_export_updates_config(converted, tmp_path):
    exported = mcore_to_hf(converted["llama"], tmp_path / "hf", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in _hf_tensors(exported).values())
    assert _config(exported)["dtype"] == "bfloat16"
