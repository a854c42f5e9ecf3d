"""Per-step training time of the same small Llama in this engine vs HF transformers' own training step.

Both sides: the same HF checkpoint (fp32, random weights), the same fixed batch (every token a target),
Adam with the same hyper-parameters and gradient clipping, one process on this machine's CPU. Ours
goes through megatron-core (DDP wrapper, megatron optimizer, pipeline schedule, vocab-parallel loss);
HF is `model(...)`, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()` with the fused kernel
(HF Trainer's default optimizer, `adamw_torch_fused`, at this torch version; ours runs the same kernel, see
training/optim.py). Rounds alternate the two sides so both see the same machine state; the median step of
each is reported.

    python benchmarks/train_step.py          # writes benchmarks/results/train_step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_results  # benchmarks/ is on sys.path when a benchmark runs as a script

from megatron_swift.compat import device_redirect_suspended
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.training.config import JobConfig, TrainSection
from megatron_swift.training.job import build_model, check_job
from megatron_swift.training.measure import median_step_seconds, tokens_per_second
from megatron_swift.training.optim import wrap_for_training
from megatron_swift.training.step import train_step

TARGET = 1.0  # ours / HF per-step time
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024)  # fmt: skip


def make_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq)}


class Ours:
    def __init__(self, hf_dir: Path, data: Path, batch: int, seq: int, lr: float):
        self.job = JobConfig()
        self.job.model.hf, self.job.data.dataset, self.job.data.seq_length = str(hf_dir), [str(data)], seq
        self.job.train = TrainSection(micro_batch_size=batch, global_batch_size=batch, lr=lr, weight_decay=0.0,
                                      lr_decay_style="constant", clip_grad=1.0, train_iters=10**6)  # fmt: skip
        self.configure(self.job)
        self.args = check_job(self.job, 1)
        init_distributed(self.job.parallel)
        self.chunks, self.optimizer, self.scheduler = wrap_for_training(build_model(self.job, self.args), self.job)

    def configure(self, job: JobConfig) -> None:
        """Variants (benchmarks/lora_step.py) adjust the job here."""

    def step(self, batch: dict) -> float:
        result = train_step(self.chunks, self.optimizer, self.scheduler, [batch], self.args.vocab_size)
        return result.loss


def hf_trainer_adamw(params, lr: float) -> torch.optim.AdamW:
    """The optimizer HF's Trainer builds by default with torch >= 2.8 (`adamw_torch_fused`), our hyper-parameters."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)


class HF:
    def __init__(self, hf_dir: Path, lr: float):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.model.train()
        self.optimizer = hf_trainer_adamw(self.model.parameters(), lr)

    def step(self, batch: dict) -> float:
        # As an HF user runs it: without the CPU shims' device-redirect mode, which our side needs.
        with device_redirect_suspended():
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(batch["tokens"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            return float(loss)


def prepare(work: Path) -> tuple[Path, Path]:
    """The benchmark model (random HF checkpoint) and a placeholder data file the job config requires."""
    hf_dir = make_tiny_model("llama", work / "hf", **SHAPE)
    data = work / "data.jsonl"
    data.write_text(json.dumps({"text": "unused: the benchmark feeds a fixed batch"}) + "\n")
    return hf_dir, data


def compare_steps(sides: dict, batch: dict, steps: int, warmup: int) -> tuple[dict, dict[str, float]]:
    """Time `sides` (ours first, the baseline second) on `batch`: the result fields both step benchmarks report,
    and the median step seconds per side.

    Rounds alternate the sides so both see the same machine state; the per-round ratio pairs the two steps
    of a round, which shows how much of a run's ratio is machine noise.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    first_losses = {}
    for _ in range(warmup + steps):
        for name, side in sides.items():
            start = time.perf_counter()
            loss = side.step(batch)
            times[name].append(time.perf_counter() - start)
            first_losses.setdefault(name, loss)
    ours, theirs = (values[warmup:] for values in times.values())
    p25, per_round, p75 = statistics.quantiles([a / b for a, b in zip(ours, theirs, strict=True)], n=4)
    median = {name: median_step_seconds(values, warmup) for name, values in times.items()}
    ours_median, their_median = median.values()
    ratio = ours_median / their_median
    fields = {
        "steps": steps,
        "threads": torch.get_num_threads(),
        "first_loss": first_losses,  # same weights and batch (LoRA: zero-initialised lora_B): should agree
        "median_step_seconds": {k: round(v, 4) for k, v in median.items()},
        "ratio_ours_to_hf": round(ratio, 3),
        "ratio_per_round": {"p25": round(p25, 3), "median": round(per_round, 3), "p75": round(p75, 3)},
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
    }
    return fields, median


def ratio_lines(results: dict, baseline: str) -> list[str]:
    verdict = "meets" if results["meets_target"] else "misses"
    spread = results["ratio_per_round"]
    return [
        f"Ratio (ours / {baseline}): **{results['ratio_ours_to_hf']:.3f}** ({verdict} the target <= {TARGET}).",
        f"Per-round ratio (the two sides' steps of each round paired): median {spread['median']:.3f}, "
        f"quartiles {spread['p25']:.3f} to {spread['p75']:.3f}.",
    ]


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)


def run(work: Path, batch: int, seq: int, steps: int, warmup: int) -> dict:
    hf_dir, data = prepare(work)
    ours, hf = Ours(hf_dir, data, batch, seq, lr=1e-4), HF(hf_dir, lr=1e-4)
    fixed = make_batch(SHAPE["vocab_size"], batch, seq)
    try:
        timing, median = compare_steps({"megatron-swift": ours, "hf-transformers": hf}, fixed, steps, warmup)
    finally:
        destroy_distributed()
    return {
        "model": {"family": "llama", **SHAPE, "parameters": sum(p.numel() for p in hf.model.parameters())},
        "batch": {"micro_batch_size": batch, "seq_length": seq, "dtype": "fp32"},
        "tokens_per_sec": {k: round(tokens_per_second(batch * seq, v), 1) for k, v in median.items()},
        **timing,
    }


def markdown(results: dict) -> str:
    m, b = results["model"], results["batch"]
    lines = [
        "# Training step: megatron-swift vs HF transformers",
        "",
        f"Llama-shaped, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, "
        f"{m['parameters']:,} parameters; batch {b['micro_batch_size']} x {b['seq_length']} tokens, {b['dtype']}, "
        f"CPU with {results['threads']} threads; median of {results['steps']} steps.",
        "",
        "| engine | median step (s) | tokens/s | first loss |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in results["median_step_seconds"].items():
        lines.append(
            f"| {name} | {seconds:.4f} | {results['tokens_per_sec'][name]:.0f} | {results['first_loss'][name]:.5f} |"
        )
    lines += ["", *ratio_lines(results, "HF")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mswift-train-bench-") as tmp:
        results = run(Path(tmp), args.batch, args.seq, args.steps, args.warmup)
    write_results(args.out_dir, "train_step", results, markdown(results))


if __name__ == "__main__":
    main()
