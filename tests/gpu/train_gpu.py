"""GPU training checks to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/train_gpu.py [--out DIR] [--steps 10]

On one GPU: a ~1.2B-parameter Llama-shaped model (hidden 2048, 16 layers, GQA 16/8, vocab 32k,
random weights), bf16, sequence 2048, micro batch 4: step time, tokens/s and MFU (convention in
megatron_swift/training/flops.py) with the local spec (SDPA core attention), with the Transformer
Engine spec when TE is installed, and an FP8 (hybrid, delayed scaling) step when TE is installed. Each
run lists the megatron-core fusions the machine turned on (training/fusions.py).
Prints a table and writes gpu_train.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import build_model_chunks, transformer_config, translate
from megatron_swift.models.family import all_families
from megatron_swift.models.tiny import tiny_hf_config
from megatron_swift.training.config import JobConfig, TrainSection, transformer_overrides
from megatron_swift.training.flops import flops_per_token, peak_flops
from megatron_swift.training.optim import wrap_for_training
from megatron_swift.training.step import train_step

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})  # fmt: skip
SEQ, MICRO_BATCH = 2048, 4


def run_variant(name: str, spec: str, fp8: bool, steps: int) -> dict:
    args = translate(tiny_hf_config(all_families()["llama"], **SHAPE))
    job = JobConfig()
    job.data.seq_length = SEQ
    job.model.spec = spec
    job.train = TrainSection(micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH, lr=1e-4, bf16=True,
                             lr_decay_style="constant", train_iters=10**6,
                             fp8_format="hybrid" if fp8 else None, fp8_recipe="delayed" if fp8 else None)  # fmt: skip
    init_distributed(job.parallel)
    try:
        overrides = transformer_overrides(job)  # includes the fusions this machine turns on (training/fusions.py)
        config = transformer_config(args, ParallelConfig(), params_dtype=torch.bfloat16, **overrides)
        chunks = build_model_chunks(args, config, spec=spec)
        chunks, optimizer, scheduler = wrap_for_training([c.cuda() for c in chunks], job)
        tokens = torch.randint(0, args.vocab_size, (MICRO_BATCH, SEQ + 1), device="cuda")
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)}
        times = []
        for i in range(steps + 3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = train_step(chunks, optimizer, scheduler, [batch], args.vocab_size)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        tokens_per_sec = MICRO_BATCH * SEQ / step
        peak = peak_flops(torch.cuda.get_device_name(), "fp8" if fp8 else "bf16")
        flops = flops_per_token(args.transformer, args.vocab_size, SEQ)
        return {
            "variant": name,
            "parameters": sum(p.numel() for c in chunks for p in c.parameters()),
            "step_s": round(step, 4),
            "tokens_per_sec": round(tokens_per_sec),
            "mfu": round(flops * tokens_per_sec / peak, 4) if peak else None,
            "loss": round(result.loss, 4),
            "max_mem_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "fusions": sorted(name for name, on in overrides.items() if name.endswith("_fusion") and on),
        }
    finally:
        destroy_distributed()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    from megatron_swift._optional import has_transformer_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tests/gpu/train_gpu.py needs a CUDA GPU")
    variants = [("bf16 local spec (SDPA)", "local", False)]
    if has_transformer_engine():
        variants += [("bf16 TE spec", "te", False), ("fp8 hybrid TE spec", "te", True)]
    rows = []
    for name, spec, fp8 in variants:
        rows.append(run_variant(name, spec, fp8, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "te": has_transformer_engine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train.json").write_text(json.dumps({**header, "runs": rows}, indent=2) + "\n")
    print(f"\n{header}\n| variant | step s | tokens/s | MFU | loss | max mem GiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_s']} | {r['tokens_per_sec']} | {r['mfu']} | {r['loss']} | {r['max_mem_gb']} |"
        )


if __name__ == "__main__":
    main()
