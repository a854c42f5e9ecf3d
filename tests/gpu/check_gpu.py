"""GPU conversion check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/check_gpu.py [--out DIR]
    python tests/gpu/check_gpu.py --smoke      # CPU, one family: checks the script, measures nothing

For every family: make the tiny model, convert it on the GPU (NCCL, no CPU shims; the Transformer
Engine spec when TE is installed, the local spec otherwise), run the logits check against HF on the
GPU with TF32 off (max |logit diff| <= 1e-4; a vision-language family on text + images of two sizes and a padded
text-only row, converters/check.py `sample_vision_batch`), and export it back. Prints a table (max |logit diff|,
seconds) and writes gpu_checks.json to --out, with the process-group backend and whether the CPU
shims were applied (they must not be on a GPU).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: converters/, tests/gpu/common.py

from converters.check import compare_valid, mcore_logits, sample_tokens, sample_vision_batch
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.checkpoint.hf import load_hf_config
from megatron_swift.compat import cpu_shims_applied
from megatron_swift.models import all_families
from megatron_swift.models.tiny import make_tiny_model
from tests.gpu.common import device_for, environment, parser, write_result

TOLERANCE = 1e-4
SMOKE_FAMILIES = ["llama", "qwen2_5_vl"]


@torch.no_grad()
def hf_logits(hf_dir: Path, batch, device: torch.device) -> torch.Tensor:
    """HF's fp32 logits on `device` for a token tensor, or a `sample_vision_batch` dict (HF's own inputs)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vision = not isinstance(batch, torch.Tensor)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    if not vision:
        return model(batch.to(device)).logits.float().cpu()
    return model(**{key: value.to(device) for key, value in batch["hf"].items()}).logits.float().cpu()


def check_family(name: str, work: Path, device: torch.device) -> dict:
    start = time.perf_counter()
    hf = make_tiny_model(name, work / name / "hf")
    mcore = hf_to_mcore(hf, work / name / "mcore")
    convert_s = time.perf_counter() - start
    hf_config = load_hf_config(hf)
    vision = all_families()[name].vision is not None
    batch = sample_vision_batch(hf_config) if vision else sample_tokens(384)  # the tiny models' vocabulary
    result = compare_valid(hf_logits(hf, batch, device), mcore_logits(mcore, batch), batch)
    mcore_to_hf(mcore, work / name / "hf-export")
    return {"family": name, **result, "convert_seconds": round(convert_s, 2)}


def main() -> None:
    args = parser(__doc__).parse_args()
    device = device_for("tests/gpu/check_gpu.py", args.smoke)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SMOKE_FAMILIES if args.smoke else sorted(all_families()):
            rows.append(check_family(name, Path(tmp), device))
            print(json.dumps(rows[-1]), flush=True)
    # init_distributed picks NCCL when CUDA is there and installs the shims only without it.
    header = {**environment(device), "backend": "nccl" if device.type == "cuda" else "gloo",
              "cpu_shims_applied": cpu_shims_applied()}  # fmt: skip
    failed = [row["family"] for row in rows if row["max_abs_diff"] > TOLERANCE]
    write_result(args.out, "gpu_checks.json", {**header, "tolerance": TOLERANCE, "families": rows, "failed": failed})
    print(f"\n{header}\n| family | max_abs_diff | argmax_agreement | convert s |\n|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['family']} | {row['max_abs_diff']:.2e} | {row['argmax_agreement']:.3f} | "
            f"{row['convert_seconds']} |"
        )
    if failed:
        raise SystemExit(f"logits out of tolerance ({TOLERANCE}): {failed}")
    if device.type == "cuda" and cpu_shims_applied():
        raise SystemExit("the CPU shims were applied on a GPU machine: the check did not test the GPU path")


if __name__ == "__main__":
    main()
