"""GPU checks to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/check_gpu.py [--out DIR]

For every family: make the tiny model, convert it on the GPU (NCCL, no CPU shims; the Transformer
Engine spec when TE is installed), run the logits check against HF on the GPU with TF32 off, and
export it back. Prints a table (max |logit diff|, seconds) and writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from converters.check import compare_logits, mcore_logits, sample_tokens
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift._optional import has_transformer_engine
from megatron_swift.models import all_families
from megatron_swift.models.tiny import make_tiny_model


@torch.no_grad()
def hf_logits_on_gpu(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").cuda()
    return model.eval()(tokens.cuda()).logits.float().cpu()


def check_family(name: str, work: Path) -> dict:
    start = time.perf_counter()
    hf = make_tiny_model(name, work / name / "hf")
    mcore = hf_to_mcore(hf, work / name / "mcore")
    convert_s = time.perf_counter() - start
    tokens = sample_tokens(384)
    result = compare_logits(hf_logits_on_gpu(hf, tokens), mcore_logits(mcore, tokens))
    mcore_to_hf(mcore, work / name / "hf-export")
    return {"family": name, **result, "convert_seconds": round(convert_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tests/gpu/check_gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "te": has_transformer_engine()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(all_families()):
            rows.append(check_family(name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_checks.json").write_text(json.dumps({**header, "families": rows}, indent=2) + "\n")
    print(f"\n{header}\n| family | max_abs_diff | argmax_agreement | convert s |\n|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['family']} | {row['max_abs_diff']:.2e} | {row['argmax_agreement']:.3f} | "
            f"{row['convert_seconds']} |"
        )
    failed = [row["family"] for row in rows if row["max_abs_diff"] > 1e-4]
    if failed:
        raise SystemExit(f"logits out of tolerance on GPU: {failed}")


if __name__ == "__main__":
    main()
