"""Acceptance: bad input gets one clear error (exit 2) naming the file and problem, and no output dir."""

import json
import re
import shutil
from pathlib import Path

import pytest

from converters.__main__ import main


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.tmp-")]


def _convert_fails(capsys, hf: Path, out: Path, *extra: str) -> str:
    code = main(["hf-to-mcore", "--hf", str(hf), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")], err
    assert _leftovers(out) == []
    return err


@pytest.fixture
def llama_copy(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "llama"))


def test_missing_and_non_hf_directories(capsys, tmp_path):
    assert "no such directory" in _convert_fails(capsys, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "not an HF model directory (no config.json)" in _convert_fails(capsys, tmp_path / "empty", tmp_path / "out")


def test_unknown_architecture_lists_supported(capsys, llama_copy, tmp_path):
    config_file = llama_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["FalconForCausalLM"]
    config_file.write_text(json.dumps(config))
    err = _convert_fails(capsys, llama_copy, tmp_path / "out")
    assert "unsupported architecture ['FalconForCausalLM']" in err
    assert "LlamaForCausalLM" in err and "Qwen3MoeForCausalLM" in err


def test_wrong_shapes_name_parameter_and_both_shapes(capsys, llama_copy, tmp_path):
    config_file = llama_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 128  # the weights were made with 160
    config_file.write_text(json.dumps(config))
    err = _convert_fails(capsys, llama_copy, tmp_path / "out")
    assert (
        "model.layers.0.mlp.gate_proj.weight: checkpoint has shape [160, 64], the model built from "
        "config.json expects [128, 64]"
    ) in err


def test_wrong_shapes_are_reported_from_worker_ranks(capsys, llama_copy, tmp_path):
    config_file = llama_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 128
    config_file.write_text(json.dumps(config))
    err = _convert_fails(capsys, llama_copy, tmp_path / "out", "--tp", "2")
    assert re.search(r"rank \d: CheckpointError", err) and "mlp.down_proj.weight: checkpoint has shape [64, 160]" in err


def test_truncated_safetensors(capsys, llama_copy, tmp_path):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _convert_fails(capsys, llama_copy, tmp_path / "out")
    assert f"{weights}: truncated safetensors file" in err


def test_layout_that_does_not_fit_the_model(capsys, tiny_models, tmp_path):
    err = _convert_fails(capsys, tiny_models["llama"], tmp_path / "out", "--tp", "3")
    assert "num_attention_heads=4 is not divisible by tensor parallel 3" in err
    assert "num_key_value_heads=2 is not divisible by tensor parallel 3" in err


def test_existing_output_is_left_untouched(capsys, tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = main(["hf-to-mcore", "--hf", str(tiny_models["qwen2"]), "--out", str(out)])
    assert code == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_mcore_to_hf_on_a_non_checkpoint(capsys, tiny_models, tmp_path):
    code = main(["mcore-to-hf", "--mcore", str(tiny_models["qwen2"]), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not a megatron-swift checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
