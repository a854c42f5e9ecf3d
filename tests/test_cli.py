"""The converter CLI end to end in fresh processes, as a user runs it, and the tiny-model example."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def test_make_tiny_model_example(tmp_path):
    _run("examples/make_tiny_model.py", "--family", "mistral", "--out", str(tmp_path / "m"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}


@pytest.mark.slow  # fresh processes for each command; each command runs in-process in the default suite
def test_cli_convert_tp2_check_export_and_load_cleanly(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, mcore, back = tiny_models["qwen3_moe"], tmp_path / "mcore", tmp_path / "back"
    _run("-m", "converters", "hf-to-mcore", "--hf", str(hf), "--out", str(mcore), "--tp", "2")
    meta = json.loads((mcore / "mswift_meta.json").read_text())
    assert meta["family"] == "qwen3_moe" and meta["saved_with"]["tensor_model_parallel_size"] == 2
    assert meta["versions"]["megatron-core"].startswith("0.")

    result = _run("-m", "converters", "check", "--hf", str(hf), "--mcore", str(mcore), "--pp", "2")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0

    # Streamed by two worker processes, each writing its own shards (~0.2 MB each here).
    _run("-m", "converters", "mcore-to-hf", "--mcore", str(mcore), "--out", str(back), "--workers", "2",
         "--max-shard-size-gb", "0.0002")  # fmt: skip
    assert len(list(back.glob("model-*-of-*.safetensors"))) >= 2
    _, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys


def test_known_third_party_notices_are_silenced_unless_verbose():
    """What the entry points import prints dozens of known notices (megatron-core's Apex/TE fallbacks, torchao's
    CUDA libraries): silenced to one summary line; MSWIFT_VERBOSE=1 shows them (so the filters match real ones)."""
    import os

    from megatron_swift.quiet import SUMMARY

    code = ("from megatron_swift.quiet import silence_known_noise; silence_known_noise(); "
            "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs, torchao")  # fmt: skip
    runs = {}
    for verbose in ("0", "1"):
        env = {**os.environ, "MSWIFT_VERBOSE": verbose, "RANK": "0"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[verbose] = result.stderr.splitlines()
    assert runs["0"] == [SUMMARY]
    noisy = "\n".join(runs["1"])
    assert "Apex are not installed" in noisy and "Apex is not installed" in noisy and SUMMARY not in noisy


@pytest.mark.parametrize(("diff", "code"), [(3e-5, 0), (1e-4, 0), (2e-4, 1)])
def test_check_exits_1_when_the_logits_differ_by_more_than_tol(diff, code, monkeypatch, capsys):
    import converters.check
    from converters.__main__ import run

    monkeypatch.setattr(converters.check, "check", lambda *args: {"max_abs_diff": diff, "argmax_agreement": 1.0})
    assert run(["check", "--hf", "H", "--mcore", "M", "--tol", "1e-4"]) == code
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["max_abs_diff"] == diff
    assert ("exceeds --tol 0.0001" in err) == bool(code)


def test_mcore_to_hf_flags_reach_the_exporter(monkeypatch, tmp_path):
    import converters.convert
    from converters.__main__ import run

    calls = []
    monkeypatch.setattr(converters.convert, "mcore_to_hf", lambda *args: calls.append(args) or Path(args[1]))
    argv = ["mcore-to-hf", "--mcore", "M", "--out", str(tmp_path), "--workers", "3", "--max-shard-size-gb", "0.5"]
    assert run([*argv, "--merge-lora"]) == 0
    assert calls == [("M", str(tmp_path), None, 2**29, "merge", 3)]
