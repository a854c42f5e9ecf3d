"""The static export check on vision-language directories: a real Qwen2.5-VL export (tiny random model ->
hf-to-mcore -> mcore-to-hf, the hub's `model.layers.*` / `visual.*` names), its source and a copy renamed to
transformers' module names (`model.language_model.*`, `model.visual.*`, which HF loads too) pass; a copy without its
processor settings and copies with a vision tensor dropped or renamed are refused, each naming what is wrong. The
names are judged against HF itself: what `from_pretrained` reports missing or unexpected when it loads the same
directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megatron_swift.serve.__main__ import main as serve_main
from megatron_swift.serve.export_check import check_export


@pytest.fixture(scope="module")
def vlm_export(tiny_models, tmp_path_factory) -> Path:
    from converters.convert import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("serve_vlm")
    return mcore_to_hf(hf_to_mcore(tiny_models["qwen2_5_vl"], root / "mcore"), root / "export")


def _hf_loading_problems(model_dir: Path) -> dict[str, list[str]]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    return {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys")}


def _weights(model_dir: Path) -> tuple[Path, dict]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) == 1
    return files[0], load_file(files[0])


def test_vlm_export_and_source_layouts_pass(vlm_export, tiny_models, tmp_path, capsys):
    _, tensors = _weights(vlm_export)
    assert any(name.startswith("visual.") for name in tensors)  # the hub's layout, vision tower included
    assert _hf_loading_problems(vlm_export) == {"missing_keys": [], "unexpected_keys": []}
    assert check_export(vlm_export) == []
    assert check_export(tiny_models["qwen2_5_vl"]) == []

    modules = Path(shutil.copytree(vlm_export, tmp_path / "module_names"))
    path, tensors = _weights(modules)
    renamed = {("model.language_model." + name[6:] if name.startswith("model.") else "model." + name
                if name.startswith("visual.") else name): tensor for name, tensor in tensors.items()}  # fmt: skip
    (modules / "model.safetensors.index.json").unlink()
    path.unlink()
    save_file(renamed, modules / "model.safetensors", metadata={"format": "pt"})
    assert _hf_loading_problems(modules) == {"missing_keys": [], "unexpected_keys": []}
    assert check_export(modules) == []
    assert serve_main(["--model", str(vlm_export), "--dry-run"]) == 0
    assert f"vllm serve {vlm_export}" in capsys.readouterr().out


def test_vlm_export_without_processor_settings_is_refused(vlm_export, tmp_path, capsys):
    broken = Path(shutil.copytree(vlm_export, tmp_path / "no_processor"))
    processor_files = [
        name for name in ("processor_config.json", "preprocessor_config.json") if (broken / name).exists()
    ]
    assert processor_files
    for name in processor_files:
        (broken / name).unlink()
    (problem,) = check_export(broken)
    assert "vision-language model" in problem and "processor_config.json or preprocessor_config.json" in problem
    assert "copy them from the base model's directory" in problem
    assert serve_main(["--model", str(broken), "--dry-run"]) == 2
    assert "image processor" in capsys.readouterr().err

    # A processor file without the image processor's settings (a tokenizer-only processor) is refused too.
    (broken / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    assert len(check_export(broken)) == 1


@pytest.mark.parametrize("change", ["drop", "rename"])
def test_vision_tensor_names_are_expected(vlm_export, tmp_path, change):
    broken = Path(shutil.copytree(vlm_export, tmp_path / change))
    path, tensors = _weights(broken)
    name = "visual.merger.mlp.0.weight"
    tensor = tensors.pop(name)
    if change == "rename":
        tensors["vision.merger.mlp.0.weight"] = tensor
    save_file(tensors, path, metadata={"format": "pt"})
    hf = _hf_loading_problems(broken)
    assert hf["missing_keys"] == ["model.visual.merger.mlp.0.weight"]  # HF's in-memory name for the hub's
    problems = check_export(broken)
    assert any(f"1 missing tensor name(s) for Qwen2_5_VLForConditionalGeneration: {name}" in p for p in problems)
    unexpected = [p for p in problems if "unexpected" in p]
    assert (unexpected != []) == (change == "rename") == (hf["unexpected_keys"] != [])
    if change == "rename":
        assert "vision.merger.mlp.0.weight" in unexpected[0]
