"""GPU training checks to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/train_gpu.py [--out DIR] [--steps 10]
    python tests/gpu/train_gpu.py --smoke      # CPU, 2-layer toy shape: checks the script, measures nothing

On one GPU: a ~1.2B-parameter Llama-shaped model (hidden 2048, 16 layers, GQA 16/8, vocab 32k,
random weights), bf16, sequence 2048, micro batch 4: step time, tokens/s and MFU (convention in
megatron_swift/training/flops.py) with the local spec (SDPA core attention), with the Transformer
Engine spec when TE is installed, and an FP8 (hybrid, delayed scaling) step when TE is installed. Each
run lists the megatron-core fusions the machine turned on (training/fusions.py).
Prints a table and writes gpu_train.json to --out.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests/gpu/common.py

from megatron_swift._optional import has_transformer_engine
from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import build_model_chunks, transformer_config, translate
from megatron_swift.models.family import all_families
from megatron_swift.models.tiny import tiny_hf_config
from megatron_swift.training.config import JobConfig, TrainSection, transformer_overrides
from megatron_swift.training.flops import flops_per_token, peak_flops
from megatron_swift.training.optim import wrap_for_training
from megatron_swift.training.step import train_step
from tests.gpu.common import device_for, environment, parser, write_result

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})  # fmt: skip
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)  # fmt: skip
# (model shape, sequence, micro batch, untimed warm-up steps)
FULL_RUN, SMOKE_RUN = (SHAPE, 2048, 4, 3), (SMOKE_SHAPE, 32, 2, 0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, spec: str, fp8: bool, steps: int, device: torch.device) -> dict:
    smoke = device.type == "cpu"
    shape, seq, micro_batch, warmup = SMOKE_RUN if smoke else FULL_RUN
    args = translate(tiny_hf_config(all_families()["llama"], **shape))
    job = JobConfig()
    job.data.seq_length = seq
    job.model.spec = spec
    job.train = TrainSection(micro_batch_size=micro_batch, global_batch_size=micro_batch, lr=1e-4, bf16=True,
                             lr_decay_style="constant", train_iters=10**6,
                             fp8_format="hybrid" if fp8 else None, fp8_recipe="delayed" if fp8 else None)  # fmt: skip
    init_distributed(job.parallel)
    try:
        overrides = transformer_overrides(job)  # includes the fusions this machine turns on (training/fusions.py)
        config = transformer_config(args, ParallelConfig(), params_dtype=torch.bfloat16, **overrides)
        chunks = build_model_chunks(args, config, spec=spec)
        chunks, optimizer, scheduler = wrap_for_training([c.to(device) for c in chunks], job)
        tokens = torch.randint(0, args.vocab_size, (micro_batch, seq + 1), device=device)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro_batch, seq)}
        times = []
        for i in range(steps + warmup):
            synchronize(device)
            start = time.perf_counter()
            result = train_step(chunks, optimizer, scheduler, [batch], args.vocab_size)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        tokens_per_sec = micro_batch * seq / step
        # No peak for a CPU: the smoke run reports no MFU (and its times mean nothing).
        peak = None if smoke else peak_flops(torch.cuda.get_device_name(), "fp8" if fp8 else "bf16")
        flops = flops_per_token(args.transformer, args.vocab_size, seq)
        return {
            "variant": name,
            "parameters": sum(p.numel() for c in chunks for p in c.parameters()),
            "step_s": round(step, 4),
            "tokens_per_sec": round(tokens_per_sec),
            "mfu": round(flops * tokens_per_sec / peak, 4) if peak else None,
            "loss": round(result.loss, 4),
            "max_mem_gb": None if smoke else round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "fusions": sorted(name for name, on in overrides.items() if name.endswith("_fusion") and on),
        }
    finally:
        destroy_distributed()
        if not smoke:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--steps", type=int, default=10)
    args = cli.parse_args()
    device = device_for("tests/gpu/train_gpu.py", args.smoke)
    variants = [("bf16 local spec (SDPA)", "local", False)]
    if has_transformer_engine():
        variants += [("bf16 TE spec", "te", False), ("fp8 hybrid TE spec", "te", True)]
    rows = []
    for name, spec, fp8 in variants:
        rows.append(run_variant(name, spec, fp8, 1 if args.smoke else args.steps, device))
        print(json.dumps(rows[-1]), flush=True)
    header = environment(device)
    write_result(args.out, "gpu_train.json", {**header, "runs": rows})
    print(f"\n{header}\n| variant | step s | tokens/s | MFU | loss | max mem GiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_s']} | {r['tokens_per_sec']} | {r['mfu']} | {r['loss']} | {r['max_mem_gb']} |"
        )
    diverged = [r["variant"] for r in rows if not math.isfinite(r["loss"])]
    if diverged:
        raise SystemExit(f"non-finite loss: {diverged}")


if __name__ == "__main__":
    main()
