"""Post-training quantization methods, each through its maintained library, saved so that
`AutoModelForCausalLM.from_pretrained` (and vLLM) load the result back.

- `int8` (CPU or GPU): torchao weight-only int8, one scale per output row (`Int8WeightOnlyConfig`,
  through transformers' `TorchAoConfig`); activations stay in the model's dtype. Embeddings and the
  output layer are kept (transformers' default for torchao), so the saving is on the decoder's linear
  layers: about 4x for fp32 weights, 2x for bf16.
- `gptq` (CUDA): 4-bit GPTQ via transformers' `GPTQConfig` (optimum + gptqmodel), calibrated on a dataset.
- `awq` (CUDA): 4-bit AWQ (W4A16) via llm-compressor, saved as compressed-tensors.
- `fp8` (CUDA): FP8 weights with dynamic per-token activation scales via llm-compressor
  (compressed-tensors; vLLM runs it natively on sm89+ GPUs).

A method whose library or GPU is missing is refused before any work, with a message naming what to
install or why (see `unavailable_reason`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Method:
    name: str
    modules: tuple[str, ...]  # importable names the method needs
    install: str  # how to get them
    needs_cuda: bool
    needs_calibration: bool


_GPU_EXTRA = "pip install 'megatron-swift[quant-gpu]'"
METHODS = {
    "int8": Method("int8", ("torchao",), "pip install 'megatron-swift[quant]' (torchao)", False, False),
    "gptq": Method("gptq", ("optimum", "gptqmodel"), f"{_GPU_EXTRA} (optimum, gptqmodel; needs CUDA)", True, True),
    "awq": Method("awq", ("llmcompressor",), f"{_GPU_EXTRA} (llmcompressor; needs CUDA)", True, True),
    "fp8": Method("fp8", ("llmcompressor",), f"{_GPU_EXTRA} (llmcompressor; needs CUDA)", True, False),
}


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unavailable_reason(name: str, calibration: str | None = None) -> str | None:
    """Why `name` cannot run here (unknown, missing library, no GPU, no calibration data), or None."""
    method = METHODS.get(name)
    if method is None:
        return f"unknown method {name!r}; choose one of {', '.join(METHODS)}"
    missing = [module for module in method.modules if not _module_available(module)]
    if missing:
        return f"{name} needs {', '.join(missing)} (not installed): {method.install}"
    if method.needs_cuda and not _cuda_available():
        return f"{name} needs a CUDA GPU (torch.cuda.is_available() is False); on CPU use --method int8"
    if method.needs_calibration and not calibration:
        return f"{name} is calibrated on data: pass --calibration DATA.jsonl"
    return None


def calibration_texts(path: str | Path, tokenizer, limit: int = 128) -> list[str]:
    """Up to `limit` texts from training-format rows: `text`, or `messages` rendered with the chat template."""
    from megatron_swift.data import DataError, read_jsonl

    texts = []
    for _, row in read_jsonl(path)[:limit]:
        if isinstance(row.get("messages"), list):
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif isinstance(row.get("text"), str):
            texts.append(row["text"])
    if not texts:
        raise DataError(f"{path}: no 'text' or 'messages' rows for calibration")
    return texts


def _int8(model_dir: Path, out: Path, texts) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config).save_pretrained(out)


def _gptq(model_dir: Path, out: Path, texts) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    config = GPTQConfig(bits=4, group_size=128, dataset=texts, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="auto")
    model.save_pretrained(out)


def _llm_compressor(model_dir: Path, out: Path, recipe, texts) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="auto")
    if texts:
        from datasets import Dataset

        oneshot(
            model=model, recipe=recipe, dataset=Dataset.from_dict({"text": texts}), num_calibration_samples=len(texts)
        )
    else:
        oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)


def _awq(model_dir: Path, out: Path, texts) -> None:
    from llmcompressor.modifiers.awq import AWQModifier

    _llm_compressor(model_dir, out, [AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])], texts)


def _fp8(model_dir: Path, out: Path, texts) -> None:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    _llm_compressor(
        model_dir, out, QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]), None
    )


RUNNERS = {"int8": _int8, "gptq": _gptq, "awq": _awq, "fp8": _fp8}
