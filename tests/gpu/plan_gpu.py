"""Planner check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/plan_gpu.py [--out DIR] [--smoke]

On one GPU, bf16, each case built and trained as a job is (training/job.py's build_chunks, wrap_for_training,
train_step on random tokens; random weights, no files): after a first step (the optimizer's states exist),
`torch.cuda.memory_allocated()` is the static memory, compared with the planner's weights + grads +
optimizer (expected equal up to megatron's small global buffers); then the peak of a second step,
`torch.cuda.max_memory_allocated()` minus that static memory, is compared with the planner's activations
(`mswift-plan`'s estimate for this machine: TE spec and fusions when installed). Target: within 15%.
Cases: a ~1B Llama shape at sequence 4096 without recomputation, with selective and with full
recomputation, the local spec (Triton kernels when installed), a small Qwen3-MoE shape, and LoRA.
`--smoke` runs tiny shapes on CPU (checks the script; compares nothing). Prints a table and writes
gpu_plan.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import translate
from megatron_swift.models.family import all_families
from megatron_swift.models.tiny import tiny_hf_config
from megatron_swift.plan.estimate import estimate
from megatron_swift.plan.layout import Target
from megatron_swift.training.config import JobConfig, TrainSection
from megatron_swift.training.job import build_chunks
from megatron_swift.training.optim import wrap_for_training
from megatron_swift.training.step import train_step
from megatron_swift.tuners.lora import LoraConfig

LLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=8192,
)
MOE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_experts=32,
    num_experts_per_tok=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    mlp_only_layers=[],
    decoder_sparse_step=1,
    max_position_embeddings=8192,
)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TOLERANCE = 0.15


def cases(smoke: bool) -> list[dict]:
    seq, shape, moe = (128, TINY, TINY) if smoke else (4096, LLAMA, MOE)
    base = dict(family="llama", shape=shape, seq=seq, micro_batch=2, train={}, model={})
    return [
        dict(base, name="llama"),
        dict(base, name="llama selective", train=dict(recompute_granularity="selective")),
        dict(
            base,
            name="llama full",
            train=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        ),
        dict(base, name="llama local spec", model=dict(spec="local")),
        dict(base, name="llama LoRA", train=dict(train_type="lora")),
        dict(base, name="qwen3-moe", family="qwen3_moe", shape=moe, micro_batch=1),
    ]


def run_case(case: dict) -> dict:
    hf_config = tiny_hf_config(all_families()[case["family"]], **case["shape"])
    args = translate(hf_config)
    job = JobConfig()
    job.data.seq_length = case["seq"]
    job.model = dataclasses.replace(job.model, **case["model"])
    job.train = TrainSection(
        micro_batch_size=case["micro_batch"],
        global_batch_size=case["micro_batch"],
        lr=1e-5,
        bf16=True,
        lr_decay_style="constant",
        train_iters=10,
        **case["train"],
    )
    if job.train.train_type == "lora":
        job.lora = LoraConfig(rank=8)
    init_distributed(job.parallel)
    try:
        chunks = build_chunks(job, args)
        if job.train.train_type == "lora":
            from megatron_swift.tuners.lora.apply import apply_lora

            apply_lora(chunks, job.lora, args.family, job.train.seed)
        chunks, optimizer, scheduler = wrap_for_training(chunks, job)
        device = next(chunks[0].parameters()).device
        tokens = torch.randint(0, args.vocab_size, (case["micro_batch"], case["seq"] + 1), device=device)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(case["micro_batch"], case["seq"]),
        }
        train_step(chunks, optimizer, scheduler, [batch], args.vocab_size)
        planned = estimate(job, 1, args, target=Target.this_machine(), with_time=False).ranks[0]
        row = {
            "case": case["name"],
            "planned_static": planned.weights_bytes + planned.grads_bytes + planned.optimizer_bytes,
            "planned_activations": planned.activations_bytes,
        }
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            train_step(chunks, optimizer, scheduler, [batch], args.vocab_size)
            torch.cuda.synchronize()
            row.update(static=static, activations=torch.cuda.max_memory_allocated() - static)
            row["ratio"] = round(row["planned_activations"] / row["activations"], 3)
        return row
    finally:
        destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args()
    if not torch.cuda.is_available() and not options.smoke:
        raise SystemExit("tests/gpu/plan_gpu.py needs a CUDA GPU (or --smoke)")
    rows = [run_case(case) for case in cases(options.smoke)]
    gib = 2**30
    print(f"{'case':<18} {'static GiB':>10} {'planned':>8} {'activ GiB':>10} {'planned':>8} {'ratio':>6}")
    failures = []
    for row in rows:
        measured = row.get("activations")
        static, planned_static = row.get("static", 0) / gib, row["planned_static"] / gib
        activations, planned = (measured or 0) / gib, row["planned_activations"] / gib
        ratio = str(row.get("ratio", "-"))
        print(
            f"{row['case']:<18} {static:>10.2f} {planned_static:>8.2f} {activations:>10.2f} {planned:>8.2f} {ratio:>6}"
        )
        if measured is not None and abs(row["ratio"] - 1) > TOLERANCE:
            failures.append(row["case"])
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "gpu_plan.json").write_text(json.dumps(rows, indent=2))
    if failures:
        raise SystemExit(f"activation estimate off by more than {TOLERANCE:.0%}: {', '.join(failures)}")


if __name__ == "__main__":
    main()
