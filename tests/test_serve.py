"""Serving: the `vllm serve` command for each option, why it does not start here, and the static export check
(run on a real `mcore-to-hf` export, whose missing generation_config.json the converter now writes)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import megatron_swift._optional as optional
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.serve.__main__ import main as serve_main
from megatron_swift.serve.__main__ import prepare
from megatron_swift.serve.command import ServeConfig, build_vllm_command, lora_rank_for
from megatron_swift.serve.export_check import check_adapter, check_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny Qwen2 whose source has no generation_config.json, through hf-to-mcore and mcore-to-hf."""
    from converters.convert import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("serve")
    source = make_tiny_model("qwen2", root / "hf", seed=6)
    (source / "generation_config.json").unlink()
    return mcore_to_hf(hf_to_mcore(source, root / "mcore"), root / "export")


def make_adapter(base: Path, out: Path, rank: int, **options) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, target_modules=["q_proj"], **options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    model.save_pretrained(out)
    return out


def test_export_has_what_vllm_needs(exported):
    assert check_export(exported) == []
    generation = json.loads((exported / "generation_config.json").read_text())
    config = json.loads((exported / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]  # derived from config.json by the converter


def test_export_check_accepts_every_family(tiny_models):
    # MoE families are the interesting ones: their stored (per-expert) names differ from transformers'
    # fused in-memory parameters.
    for name, path in tiny_models.items():
        assert check_export(path) == [], name


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_export_check_names_each_problem(exported, tmp_path):
    broken = _copy(exported, tmp_path / "a")
    (broken / "generation_config.json").unlink()
    (broken / "tokenizer.json").unlink()
    config = json.loads((broken / "config.json").read_text())
    del config["architectures"]
    (broken / "config.json").write_text(json.dumps(config))
    problems = check_export(broken)
    assert any("missing field 'architectures'" in p for p in problems)
    assert any("no tokenizer files" in p for p in problems)
    assert any("no generation_config.json" in p for p in problems)

    renamed = _copy(exported, tmp_path / "b")  # one tensor under a name the architecture does not have
    from safetensors.torch import load_file, save_file

    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    shard = renamed / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.final_norm.weight"] = index["weight_map"].pop("model.norm.weight")
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = check_export(renamed)
    assert len(problems) == 2
    assert "1 missing tensor name(s) for Qwen2ForCausalLM: model.norm.weight" in problems[0]
    assert "1 unexpected tensor name(s) for Qwen2ForCausalLM: model.final_norm.weight" in problems[1]
    assert check_export(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: no config.json (not an HF model directory)"]


@pytest.mark.parametrize(
    ("config", "expected_tail"),
    [
        (ServeConfig("M"), ["--tensor-parallel-size", "1"]),
        (ServeConfig("M", tensor_parallel_size=4), ["--tensor-parallel-size", "4"]),
        (ServeConfig("M", served_model_name="tuned"), ["--served-model-name", "tuned", "--tensor-parallel-size", "1"]),
        (ServeConfig("M", host="0.0.0.0", port=8001),
         ["--host", "0.0.0.0", "--port", "8001", "--tensor-parallel-size", "1"]),
        (ServeConfig("M", max_model_len=4096), ["--tensor-parallel-size", "1", "--max-model-len", "4096"]),
        (ServeConfig("M", dtype="bfloat16"), ["--tensor-parallel-size", "1", "--dtype", "bfloat16"]),
        (ServeConfig("M", gpu_memory_utilization=0.8),
         ["--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.8"]),
        (ServeConfig("M", adapters={"a": "/x/a", "b": "/y/b"}, max_lora_rank=32, max_loras=2),
         ["--tensor-parallel-size", "1", "--enable-lora", "--lora-modules", "a=/x/a", "b=/y/b", "--max-lora-rank", "32",
          "--max-loras", "2"]),
        (ServeConfig("M", extra_args=["--enforce-eager"]), ["--tensor-parallel-size", "1", "--enforce-eager"]),
    ],
)  # fmt: skip
def test_each_option_renders(config, expected_tail):
    assert build_vllm_command(config) == ["vllm", "serve", "M", *expected_tail]
    assert config.problems() == []


def test_option_problems_and_lora_ranks():
    bad = ServeConfig("M", tensor_parallel_size=0, port=70000, dtype="int3", max_lora_rank=12, max_loras=2)
    assert len(bad.problems()) == 5
    assert lora_rank_for([8]) == 8 and lora_rank_for([4, 20]) == 32
    with pytest.raises(ValueError, match="exceeds"):
        lora_rank_for([1024])


def test_cli_with_adapters_derives_the_lora_rank(exported, tmp_path, capsys):
    first = make_adapter(exported, tmp_path / "a1", rank=8)
    second = make_adapter(exported, tmp_path / "a2", rank=20)
    assert check_adapter(first) == ([], 8)
    saved = make_adapter(exported, tmp_path / "a3", rank=8, modules_to_save=["lm_head"])
    assert "modules_to_save ['lm_head'] (vLLM serves LoRA weights only)" in check_adapter(saved)[0][0]
    argv = ["--model", str(exported), "--adapter", f"sql={first}", "--adapter", f"chat={second}", "--port", "9000"]
    argv += ["--max-model-len", "512", "--dry-run", "--", "--enforce-eager"]
    assert serve_main([*argv[:6], "--max-lora-rank", "16", "--dry-run"]) == 2
    assert "--max-lora-rank 16 is below an adapter's rank 20" in capsys.readouterr().err
    assert serve_main(argv) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command == [
        "vllm", "serve", str(exported), "--port", "9000", "--tensor-parallel-size", "1", "--max-model-len", "512",
        "--enable-lora", "--lora-modules", f"sql={first}", f"chat={second}", "--max-lora-rank", "32", "--enforce-eager",
    ]  # fmt: skip


def test_without_vllm_or_gpu_it_says_why_and_shows_the_command(exported, monkeypatch, capsys):
    monkeypatch.setattr(optional, "_installed", lambda module: False)
    assert serve_main(["--model", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot start vLLM: vllm is not installed; pip install 'megatron-swift[serve]'" in err
    assert f"vllm serve {exported} --tensor-parallel-size 1" in err

    monkeypatch.setattr(optional, "_installed", lambda module: True)  # "installed", still no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serve_main(["--model", str(exported)]) == 2
    assert "no CUDA GPU is visible (torch.cuda.is_available() is False)" in capsys.readouterr().err


def test_bad_adapter_and_export_stop_serving(exported, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert serve_main(["--model", str(tmp_path / "empty"), "--adapter", f"x={tmp_path}", "--adapter", "noname"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: no adapter_config.json (not a PEFT adapter directory)" in err
    assert "--adapter 'noname': give NAME=DIR" in err
    assert "no config.json" in err
    command, problems, _ = prepare(["--model", str(exported), "--tensor-parallel-size", "0"])
    assert problems == ["--tensor-parallel-size must be >= 1"] and command[:3] == ["vllm", "serve", str(exported)]
