"""What every GPU check shares: its command line (--out, --smoke), where it ran, and which extras are absent.

The device machine gets the repo plus the wheels of tests/gpu/bundle.sh, nothing else: Transformer
Engine and vLLM are far over the 64 MiB it carries, so every check runs without them and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

NOT_CARRIED = "not installed: its wheels are far over the 64 MiB the device machine is sent, so its variants skip"
SMOKE_DEVICE = "cpu (--smoke: checks the script on tiny shapes, measures nothing)"


def parser(doc: str) -> argparse.ArgumentParser:
    args = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--out", type=Path, default=Path("gpu-results"), help="folder for the JSON result")
    args.add_argument("--smoke", action="store_true", help="without CUDA: the code path on tiny shapes")
    return args


def device_for(script: str, smoke: bool) -> torch.device:
    """cuda, or cpu for --smoke (the package then applies its CPU shims itself, in init_distributed)."""
    if smoke:
        if torch.cuda.is_available():  # the package would put parts of the run on the GPU anyway
            raise SystemExit(f"{script} --smoke is for a machine without CUDA")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU (or --smoke on CPU)")
    return torch.device("cuda")


def environment(device: torch.device) -> dict:
    from megatron_swift._optional import has_transformer_engine

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else SMOKE_DEVICE,
        "torch": torch.__version__,
        "transformer_engine": "installed" if has_transformer_engine() else NOT_CARRIED,
        "vllm": "installed" if importlib.util.find_spec("vllm") else NOT_CARRIED,
    }


def write_result(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
