"""Load an HF model directory (an export of `mswift-convert mcore-to-hf`, or any HF model) for evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EvalInputError(ValueError):
    """A bad model directory, data file or option; the message names it and what to fix."""


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise EvalInputError(f"{path}: not an HF model directory (no config.json); pass an `mcore-to-hf` export")
    return path


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(model_dir))
    if tokenizer.pad_token_id is None:  # batching needs a pad id; it is never a target
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu"):
    """The causal LM in eval mode, on `device`, in `dtype` ("auto" keeps the stored dtype)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise EvalInputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(model_dir), dtype=DTYPES[dtype])
    return model.to(device).eval()
