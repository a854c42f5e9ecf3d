"""Per-step time of a LoRA step on the same small Llama: this engine vs HF transformers + PEFT.

Both sides: the same HF checkpoint (fp32, random weights), LoRA rank 8 / alpha 16 on all linear
layers (attention and MLP projections, not the output layer), the same fixed batch, Adam with the
same hyper-parameters and gradient clipping (fused AdamW on both sides, as in train_step.py), one
process on this machine's CPU. Rounds alternate the two sides; the median step of each is reported.
Peak RSS is measured per side in a fresh process (building the model, then the same number of steps;
memory above the imports), since both sides share the timing process.
Trainable parameters differ by design: one lora_A serves megatron's fused q/k/v and gate/up linears
where PEFT has one per projection.

    python benchmarks/lora_step.py          # writes benchmarks/results/lora_step.{json,md}
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import peak_rss, reset_peak_rss  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_io import write_results
from train_step import (
    HF,
    SHAPE,
    Ours,
    add_step_arguments,
    compare_steps,
    hf_trainer_adamw,
    make_batch,
    prepare,
    ratio_lines,
)

from megatron_swift.distributed import destroy_distributed
from megatron_swift.tuners.lora import LoraConfig
from megatron_swift.tuners.lora.apply import parameter_counts

RANK, ALPHA = 8, 16.0


class OursLora(Ours):
    def configure(self, job) -> None:
        job.train.train_type = "lora"
        job.lora = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=["all-linear"])

    def trainable(self) -> int:
        return parameter_counts(self.chunks)[0]


class HFPeft(HF):
    def __init__(self, hf_dir: Path, lr: float):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        super().__init__(hf_dir, lr)
        self.model = get_peft_model(self.model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = hf_trainer_adamw(trainable, lr)

    def trainable(self) -> int:
        return self.model.get_nb_trainable_parameters()[0]


def build(side: str, work: Path, batch: int, seq: int):
    hf_dir, data = work / "hf", work / "data.jsonl"
    if side == "megatron-swift":
        return OursLora(hf_dir, data, batch, seq, lr=1e-4)
    return HFPeft(hf_dir, lr=1e-4)


def peak_rss_mb(side: str, work: Path, batch: int, seq: int, steps: int) -> float:
    """Peak resident memory above the imports of a fresh process that builds `side` (model, optimizer)
    and runs `steps` steps."""
    command = [sys.executable, __file__, "--rss-side", side, "--work", str(work), "--batch", str(batch),
               "--seq", str(seq), "--steps", str(steps)]  # fmt: skip
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _rss_child(side: str, work: Path, batch: int, seq: int, steps: int) -> None:
    fixed = make_batch(SHAPE["vocab_size"], batch, seq)
    base = reset_peak_rss()
    model = build(side, work, batch, seq)
    for _ in range(steps):
        model.step(fixed)
    print((peak_rss() - base) / 2**20)
    destroy_distributed()


def run(work: Path, batch: int, seq: int, steps: int, warmup: int) -> dict:
    prepare(work)
    sides = {name: build(name, work, batch, seq) for name in ("megatron-swift", "hf-transformers+peft")}
    trainable = {name: side.trainable() for name, side in sides.items()}
    try:
        timing, _ = compare_steps(sides, make_batch(SHAPE["vocab_size"], batch, seq), steps, warmup)
    finally:
        destroy_distributed()
    rss = {name: round(peak_rss_mb(name, work, batch, seq, warmup + 2), 1) for name in sides}
    return {
        "model": {"family": "llama", **SHAPE},
        "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": "all-linear"},
        "batch": {"micro_batch_size": batch, "seq_length": seq, "dtype": "fp32"},
        "trainable_params": trainable,
        "peak_rss_mb": rss,
        **timing,
    }


def markdown(results: dict) -> str:
    m, b = results["model"], results["batch"]
    lines = [
        "# LoRA step: megatron-swift vs HF transformers + PEFT",
        "",
        f"Llama-shaped, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}; LoRA rank "
        f"{RANK}, alpha {ALPHA:g}, all linear layers; batch {b['micro_batch_size']} x {b['seq_length']} tokens, "
        f"{b['dtype']}, CPU with {results['threads']} threads; median of {results['steps']} steps.",
        "",
        "| engine | median step (s) | trainable params | peak RSS above imports (MB) | first loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in results["median_step_seconds"].items():
        lines.append(
            f"| {name} | {seconds:.4f} | {results['trainable_params'][name]:,} | {results['peak_rss_mb'][name]:.0f} "
            f"| {results['first_loss'][name]:.5f} |"
        )
    lines += ["", *ratio_lines(results, "HF+PEFT")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--rss-side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_side:
        _rss_child(args.rss_side, args.work, args.batch, args.seq, args.steps)
        return
    with tempfile.TemporaryDirectory(prefix="mswift-lora-bench-") as tmp:
        results = run(Path(tmp), args.batch, args.seq, args.steps, args.warmup)
    write_results(args.out_dir, "lora_step", results, markdown(results))


if __name__ == "__main__":
    main()
