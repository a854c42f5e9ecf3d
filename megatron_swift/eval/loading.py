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
    """The causal LM (a vision-language model's image-text-to-text class when its config has a vision tower) in
    eval mode, on `device`, in `dtype` ("auto" keeps the stored dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise EvalInputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = check_model_dir(model_dir)
    vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto_class.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device).eval()


def load_image_processor(model_dir: str | Path, first_image_row: str):
    """The model's HF processor for rows with images; EvalInputError naming the first such row when the model has
    none (a text-only model)."""
    from megatron_swift.models.tiny_processor import load_processor

    processor = load_processor(check_model_dir(model_dir))
    if processor is None:
        raise EvalInputError(
            f"{first_image_row}: the row has images but {model_dir} has no image processor (no processor_config.json "
            "/ preprocessor_config.json: a text-only model); evaluate image rows with a vision-language model's export"
        )
    return processor
