"""Quantization: torchao int8 round trip on CPU (size, perplexity bound, from_pretrained), gated GPU paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.quantize import methods
from megatron_swift.quantize.__main__ import main as quantize_main
from tests.tiny_tuning import SFT_DATA, fine_tune

# Stated bound for int8 weight-only (per-row scales) on the tiny models: perplexity within 1% of the original.
PERPLEXITY_BOUND = 0.01


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    return fine_tune(make_tiny_model("qwen2", root / "base", seed=5), root / "tuned")


def test_int8_round_trip_shrinks_and_keeps_perplexity(tuned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int8"
    argv = ["--model", str(tuned), "--out", str(out), "--eval-data", str(SFT_DATA), "--seq-length", "64"]
    assert quantize_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    original, quantized = report["results"]["original"], report["results"]["int8"]
    # Size on disk: the decoder's linear layers go from 4 bytes to 1 byte (+ a scale per row).
    stored = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert quantized["size"]["disk_mb"] == pytest.approx(stored / 2**20)
    assert report["size_ratio"] < 0.6
    ratio = quantized["perplexity"]["perplexity"] / original["perplexity"]["perplexity"]
    assert ratio == pytest.approx(report["perplexity_ratio"])
    assert abs(ratio - 1) < PERPLEXITY_BOUND, ratio
    assert original["perplexity"]["perplexity"] < 200  # the tuned model, not a near-uniform random one
    assert "size ratio" in capsys.readouterr().out

    # Loads back with plain from_pretrained: int8 torchao weights, logits close to the original's.
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    reference = AutoModelForCausalLM.from_pretrained(tuned).eval()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(tokens).logits - reference(tokens).logits).abs().max().item()
    assert 0 < diff < 0.1  # quantized (not a copy), and close
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}


def test_existing_output_is_refused_and_left_alone(tuned, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize_main(["--model", str(tuned), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("method", "available", "cuda", "calibration", "message"),
    [
        ("gptq", set(), False, "d.jsonl", "gptq needs optimum, gptqmodel (not installed): pip install "
         "'megatron-swift[quant-gpu]' (optimum, gptqmodel; needs CUDA)"),
        ("awq", {"llmcompressor"}, False, "d.jsonl", "awq needs a CUDA GPU (torch.cuda.is_available() is False); "
         "on CPU use --method int8"),
        ("awq", {"llmcompressor"}, True, None, "awq is calibrated on data: pass --calibration DATA.jsonl"),
        ("fp8", set(), True, None, "fp8 needs llmcompressor (not installed)"),
        ("fp8", {"llmcompressor"}, False, None, "fp8 needs a CUDA GPU"),
        ("int8", set(), False, None, "int8 needs torchao (not installed): pip install 'megatron-swift[quant]'"),
        ("int4", set(), False, None, "unknown method 'int4'; choose one of int8, gptq, awq, fp8"),
    ],
)  # fmt: skip
def test_gated_methods_say_why(monkeypatch, method, available, cuda, calibration, message):
    monkeypatch.setattr(methods, "_module_available", lambda name: name in available)
    monkeypatch.setattr(methods, "_cuda_available", lambda: cuda)
    assert message in methods.unavailable_reason(method, calibration)


def test_gated_method_fails_before_any_work(tuned, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "_module_available", lambda name: False)
    argv = ["--model", str(tuned), "--out", str(tmp_path / "q"), "--method", "gptq", "--calibration", str(SFT_DATA)]
    assert quantize_main(argv) == 2
    assert "error: gptq needs" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_calibration_texts_from_training_rows(tmp_path):
    from megatron_swift.data import DataError
    from megatron_swift.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    data = tmp_path / "calib.jsonl"
    rows = [{"text": "plain"}, {"messages": [{"role": "user", "content": "hi"}]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert methods.calibration_texts(data, tokenizer) == ["plain", "<|im_start|>user\nhi<|im_end|>\n"]
    assert methods.calibration_texts(data, tokenizer, limit=1) == ["plain"]
    data.write_text(json.dumps({"other": 1}) + "\n")
    with pytest.raises(DataError, match="no 'text' or 'messages' rows for calibration"):
        methods.calibration_texts(data, tokenizer)
