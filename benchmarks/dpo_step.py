"""Per-step time of a DPO step on the same small Llama: this engine vs TRL's DPOTrainer, at equal config.

Both sides: the same HF checkpoint (fp32, random weights) as the policy and, frozen, as the reference (full
training: a second copy on both sides), the same fixed batch of pairs (prompt, chosen, rejected; every pair's
chosen and rejected rows in one forward), sigmoid loss with beta 0.1, Adam with the same hyper-parameters and
gradient clipping (the fused kernel on both sides), one process on this machine's CPU. Ours is
`Preference.train_step` (the reference's forward-only schedule, then megatron-core's schedule, optimizer and
vocab-parallel log-probs); TRL's is `DPOTrainer.training_step` (its reference forward, policy forward and
backward), `clip_grad_norm_` and the optimizer step. Rounds alternate the two sides; the median step of each is
reported, and the first step's losses should agree (same weights, same batch).

    python benchmarks/dpo_step.py          # writes benchmarks/results/dpo_step.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_results  # benchmarks/ is on sys.path when a benchmark runs as a script
from train_step import SHAPE, Ours, add_step_arguments, compare_steps, hf_trainer_adamw, prepare, ratio_lines

from megatron_swift.compat import device_redirect_suspended
from megatron_swift.distributed import destroy_distributed
from megatron_swift.training.job import build_preference, check_weights

BETA = 0.1


def make_pairs(vocab: int, pairs: int, seq: int) -> dict[str, torch.Tensor]:
    """`pairs` pairs of seq + 1 tokens each side: a shared prompt of half the length, then different completions.
    Returned as TRL's collated batch (input_ids, attention_mask, completion_mask: chosen rows, then rejected)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (pairs, seq // 2), generator=generator)
    completions = torch.randint(0, vocab, (2 * pairs, seq + 1 - seq // 2), generator=generator)
    input_ids = torch.cat([prompt.repeat(2, 1), completions], dim=1)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, seq // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}


def ours_batch(trl_batch: dict) -> dict[str, torch.Tensor]:
    """The same pairs as our pair collate makes them (data/pairs.py)."""
    ids = trl_batch["input_ids"]
    rows, seq = ids.shape[0], ids.shape[1] - 1
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": trl_batch["completion_mask"][:, 1:].float(),
            "token_mask": torch.ones(rows, seq), "pair_weight": torch.ones(rows // 2)}  # fmt: skip


class OursDpo(Ours):
    def __init__(self, hf_dir: Path, data: Path, pairs: int, seq: int, lr: float):
        super().__init__(hf_dir, data, pairs, seq, lr)
        self.preference = build_preference(self.job, self.args, self.chunks, check_weights(self.job, self.chunks,
                                                                                            self.args))  # fmt: skip

    def configure(self, job) -> None:
        job.train.task = "dpo"
        job.data.dataset = ["examples/data/dpo_sample.jsonl"]  # checked by preflight only: the batch is fixed
        job.rlhf.beta = BETA

    def step(self, batch: dict) -> float:
        microbatch = ours_batch(batch)
        return self.preference.train_step(self.chunks, self.optimizer, self.scheduler, [microbatch],
                                          self.args.vocab_size).loss  # fmt: skip


class Trl:
    def __init__(self, hf_dir: Path, work: Path, lr: float):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        # fp32 as ours (TrainingArguments would otherwise autocast to bf16 on a CPU that has it)
        args = DPOConfig(output_dir=str(work / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False, beta=BETA,
                         learning_rate=lr, per_device_train_batch_size=2, max_grad_norm=1.0,
                         disable_tqdm=True)  # fmt: skip
        unused = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # the batch is fixed
        policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.trainer = DPOTrainer(model=policy, args=args, train_dataset=unused,  # TRL loads the reference copy
                                  processing_class=AutoTokenizer.from_pretrained(hf_dir))  # fmt: skip
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its training steps
        self.model = self.trainer.model
        self.model.train()
        self.optimizer = hf_trainer_adamw(self.model.parameters(), lr)

    def step(self, batch: dict) -> float:
        with device_redirect_suspended():  # as a TRL user runs it: without our CPU shims' device redirect
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.trainer.training_step(self.model, batch)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            return float(loss)


def run(work: Path, pairs: int, seq: int, steps: int, warmup: int) -> dict:
    hf_dir, data = prepare(work)
    ours, trl = OursDpo(hf_dir, data, pairs, seq, lr=1e-4), Trl(hf_dir, work, lr=1e-4)
    fixed = make_pairs(SHAPE["vocab_size"], pairs, seq)
    try:
        timing, median = compare_steps({"megatron-swift": ours, "trl-dpotrainer": trl}, fixed, steps, warmup)
    finally:
        destroy_distributed()
    return {
        "model": {"family": "llama", **SHAPE, "parameters": sum(p.numel() for p in trl.model.parameters())},
        "batch": {"pairs": pairs, "sequences": 2 * pairs, "seq_length": seq, "dtype": "fp32"},
        "dpo": {"loss_type": "sigmoid", "beta": BETA, "reference": "frozen copy (full training)"},
        "pairs_per_sec": {k: round(pairs / v, 2) for k, v in median.items()},
        **timing,
    }


def markdown(results: dict) -> str:
    m, b = results["model"], results["batch"]
    lines = [
        "# DPO step: megatron-swift vs TRL's DPOTrainer",
        "",
        f"Llama-shaped, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, "
        f"{m['parameters']:,} parameters, full training with a frozen reference copy; {b['pairs']} pairs "
        f"({b['sequences']} sequences) x {b['seq_length']} tokens, sigmoid loss, {b['dtype']}, CPU with "
        f"{results['threads']} threads; median of {results['steps']} steps.",
        "",
        "| engine | median step (s) | pairs/s | first loss |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in results["median_step_seconds"].items():
        lines.append(
            f"| {name} | {seconds:.4f} | {results['pairs_per_sec'][name]:.2f} | {results['first_loss'][name]:.5f} |"
        )
    lines += ["", *ratio_lines(results, "TRL")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.set_defaults(batch=2)  # pairs: 4 sequences, as the other step benchmarks' batch of 4
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mswift-dpo-bench-") as tmp:
        results = run(Path(tmp), args.batch, args.seq, args.steps, args.warmup)
    write_results(args.out_dir, "dpo_step", results, markdown(results))


if __name__ == "__main__":
    main()
