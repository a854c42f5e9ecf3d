"""Quantize an HF directory into a new one, and measure what it cost: size on disk and perplexity.

The output is written to a temporary sibling and renamed into place when complete; it holds the
quantized weights and config (`save_pretrained`), the source's tokenizer and other side files, and
`report.json` / `report.md` (original vs quantized). Perplexity is measured on the quantized model
loaded back from that directory with `from_pretrained`, so the figure is the saved model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron_swift.eval.loading import check_model_dir, load_model, load_tokenizer
from megatron_swift.eval.perplexity import encode_rows, masked_loss
from megatron_swift.eval.report import write_report
from megatron_swift.fs import atomic_directory
from megatron_swift.quantize.methods import METHODS, RUNNERS, calibration_texts, unavailable_reason

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Written by save_pretrained for the quantized model, or reports of an earlier quantization of the source.
_NOT_COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json", "report.json", "report.md")


class QuantizeError(ValueError):
    """A method that cannot run here, or bad input; the message says what to do."""


def weights_bytes(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, chat template and other non-weight files the quantized save does not write."""
    for item in src.iterdir():
        keep = item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in _NOT_COPIED
        if keep and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    method: str = "int8",
    eval_data: str | Path | None = None,
    calibration: str | Path | None = None,
    task: str = "sft",
    seq_length: int = 512,
    device: str = "cpu",
) -> dict:
    """Quantize `model_dir` into `out_dir` with `method`; returns the report (also written to out_dir)."""
    reason = unavailable_reason(method, calibration)
    if reason:
        raise QuantizeError(reason)
    model_dir = check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    samples = encode_rows(eval_data, tokenizer, seq_length, task) if eval_data else None  # bad rows fail here
    texts = calibration_texts(calibration, tokenizer) if METHODS[method].needs_calibration else None

    with atomic_directory(Path(out_dir)) as tmp:  # refuses a non-empty output before any work
        results = {"original": {"size": {"disk_mb": weights_bytes(model_dir) / 2**20}}}
        if samples:
            results["original"]["perplexity"] = masked_loss(load_model(model_dir, device=device), samples)
        RUNNERS[method](model_dir, tmp, texts)
        _copy_side_files(model_dir, tmp)
        results[method] = {"size": {"disk_mb": weights_bytes(tmp) / 2**20}}
        if samples:
            results[method]["perplexity"] = masked_loss(load_model(tmp, device=device), samples)
        report = {
            "settings": {"model": str(model_dir), "method": method, "eval_data": str(eval_data), "task": task},
            "results": results,
            "size_ratio": results[method]["size"]["disk_mb"] / results["original"]["size"]["disk_mb"],
        }
        if samples:
            before, after = results["original"]["perplexity"], results[method]["perplexity"]
            report["perplexity_ratio"] = after["perplexity"] / before["perplexity"]
        write_report(tmp, report, title=f"Quantization: {method}")
    return report
