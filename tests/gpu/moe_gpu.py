"""MoE dispatcher check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/moe_gpu.py [--out DIR] [--smoke]

On one GPU, fp32 with TF32 off: a tiny Mixtral trained 3 steps on the same batches with megatron-core's
all-to-all token dispatcher (the GPU default, `moe.moe_token_dispatcher_type: auto`) and with the
all-gather one (what every CPU test runs), dropless and with `moe_expert_capacity_factor: 1.0` (token
dropping). Per-step losses and the logged load-balancing loss must agree between dispatchers within
1e-5 relative. `--smoke` runs the all-gather variants on CPU (checks the script, compares nothing).
Prints a table and writes gpu_moe.json to --out.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: launch/ and tests/ are not installed

from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.training.config import JobConfig, TrainSection
from megatron_swift.training.job import build_model, check_job
from megatron_swift.training.optim import wrap_for_training
from megatron_swift.training.step import train_step
from tests.gpu.common import device_for, environment, parser, write_result

SEQ, MICRO_BATCH, STEPS, REL_TOL = 64, 2, 3, 1e-5


def run_variant(hf_dir: Path, data: Path, dispatcher: str, capacity: float | None) -> dict:
    job = JobConfig()
    job.model.hf, job.data.dataset, job.data.seq_length = str(hf_dir), [str(data)], SEQ
    job.train = TrainSection(micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH, lr=1e-3,
                             lr_decay_style="constant", train_iters=STEPS)  # fmt: skip
    job.moe.moe_token_dispatcher_type, job.moe.moe_expert_capacity_factor = dispatcher, capacity
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks, optimizer, scheduler = wrap_for_training(build_model(job, args), job)
        device = next(chunks[0].parameters()).device
        generator = torch.Generator().manual_seed(0)
        losses, router = [], []
        for _ in range(STEPS):
            tokens = torch.randint(0, args.vocab_size, (MICRO_BATCH, SEQ + 1), generator=generator).to(device)
            batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)}
            result = train_step(chunks, optimizer, scheduler, [batch], args.vocab_size)
            losses.append(result.loss)
            router.append(result.router_losses.get("load_balancing_loss"))
        return {"dispatcher": dispatcher, "capacity_factor": capacity, "losses": losses, "load_balancing": router}
    finally:
        destroy_distributed()


def main() -> None:
    args = parser(__doc__).parse_args()
    header = environment(device_for("tests/gpu/moe_gpu.py", args.smoke))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dispatchers = ["allgather"] if args.smoke else ["allgather", "alltoall"]
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="mswift-moe-gpu-") as tmp:
        hf_dir = make_tiny_model("mixtral", Path(tmp) / "hf")
        data = Path(tmp) / "data.jsonl"
        data.write_text(json.dumps({"text": "unused: the check feeds its own batches"}) + "\n")
        for capacity in (None, 1.0):
            runs = [run_variant(hf_dir, data, dispatcher, capacity) for dispatcher in dispatchers]
            rows += runs
            reference = runs[0]
            for run in runs[1:]:
                for key in ("losses", "load_balancing"):
                    worst = max(abs(a - b) / abs(b) for a, b in zip(run[key], reference[key], strict=True))
                    if worst > REL_TOL:
                        failures.append(f"{run['dispatcher']} capacity={capacity} {key}: {worst:.2e} > {REL_TOL}")
    write_result(args.out, "gpu_moe.json", {**header, "runs": rows, "failures": failures})
    print(f"\n{header}\n| dispatcher | capacity | losses | load-balancing loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dispatcher']} | {r['capacity_factor']} | {r['losses']} | {r['load_balancing']} |")
    if failures:
        raise SystemExit("dispatchers disagree:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
