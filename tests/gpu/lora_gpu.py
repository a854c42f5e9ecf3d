"""GPU LoRA check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/lora_gpu.py [--out DIR]

The Transformer Engine layer spec fuses the pre-attention / pre-MLP norms into linear_qkv /
linear_fc1 (TELayerNormColumnParallelLinear), so the LoRA adapter there normalises its own input
(megatron_swift/tuners/lora/layers.py). This compares, in fp32 with TF32 off, the logits of a tiny
Llama with the same non-zero adapters under the local spec and under the TE spec (<= 1e-4). Writes
gpu_lora.json to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import build_model_chunks, transformer_config, translate
from megatron_swift.models.forward import forward_logits
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.tuners.lora import LoraConfig, apply_lora

LORA = LoraConfig(rank=4, alpha=8.0, init_b_zero=False)


def lora_logits(hf_dir: Path, spec: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_swift.checkpoint.engine import load_hf_into_chunks
    from megatron_swift.checkpoint.hf import HFCheckpoint

    checkpoint = HFCheckpoint(hf_dir)
    args = translate(checkpoint.config)
    init_distributed(ParallelConfig())
    try:
        chunks = build_model_chunks(args, transformer_config(args, ParallelConfig()), spec=spec)
        chunks = [chunk.cuda() for chunk in chunks]
        load_hf_into_chunks(chunks, checkpoint, args)
        apply_lora(chunks, LORA, args.family, seed=0)
        return forward_logits(chunks, tokens.cuda(), args.vocab_size)
    finally:
        destroy_distributed()


def main() -> None:
    from megatron_swift._optional import has_transformer_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or not has_transformer_engine():
        raise SystemExit("tests/gpu/lora_gpu.py needs a CUDA GPU and transformer-engine")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model("llama", Path(tmp) / "llama")
        tokens = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
        local, te = lora_logits(hf_dir, "local", tokens), lora_logits(hf_dir, "te", tokens)
    result = {"device": torch.cuda.get_device_name(), "max_abs_diff_local_vs_te": float((local - te).abs().max())}
    result["ok"] = result["max_abs_diff_local_vs_te"] <= 1e-4
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_lora.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
