"""Peak memory (and time) of the fused linear + cross-entropy loss against the unfused logits path.

Shape of the issue: 4096 tokens, hidden 1024, vocabulary 151,936 (Qwen2's), fp32, one rank. Variants,
each forward + backward of sum(loss_mask * CE(hidden @ weight.T, labels)):

- `unfused-megatron`: what training/step.py does without the fused loss: full fp32 logits through
  megatron-core's vocab_parallel_cross_entropy (already in-place: logits -> softmax -> gradient);
- `unfused-torch`: full logits through F.cross_entropy (log-softmax saved, a separate gradient);
- `fused-torch`: kernels/fused_linear_cross_entropy with the pure-torch chunk steps (the CPU path);
- `fused-triton`: the same with the Triton chunk steps (only when a CUDA GPU is present).

Measurement: every variant runs in a fresh process. On CPU, the process resets the kernel's peak-RSS
mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) once the inputs exist, and reads VmHWM after the
backward: the peak *above* the resident size before the loss, i.e. what the loss itself needs at its
worst moment (logits, softmax, gradient temporaries, the weight gradient), with the inputs excluded.
tracemalloc does not see torch's allocations and ru_maxrss cannot be reset, hence this. On a GPU,
torch.cuda.max_memory_allocated after reset_peak_memory_stats gives the same quantity.

    python benchmarks/kernels.py          # writes benchmarks/results/kernels.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import peak_rss, reset_peak_rss  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_io import write_results

TARGET = 0.25  # fused peak / unfused (megatron) peak
SHAPE = {"tokens": 4096, "hidden": 1024, "vocab": 151936}


def _inputs(device: str, tokens: int, hidden: int, vocab: int):
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, device=device).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=gen, device=device).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    mask = (torch.rand(tokens, generator=gen, device=device) > 0.1).float()
    return h, weight, labels, mask


def _loss(variant: str, h, weight, labels, mask):
    if variant == "unfused-megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = (h @ weight.t()).float()
        return (vocab_parallel_cross_entropy(logits, labels) * mask).sum()
    if variant == "unfused-torch":
        from megatron_swift_kernels.fused_linear_cross_entropy.reference import linear_cross_entropy

        return linear_cross_entropy(h, weight, labels, mask)
    from megatron_swift_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h, weight, labels, mask, backend=variant.split("-")[1])


def _init_single_rank_world() -> None:
    """megatron's vocab_parallel_cross_entropy reads the TP group: a world of one (gloo)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_swift.distributed.runtime import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def measure(variant: str, tokens: int, hidden: int, vocab: int) -> dict:
    """In this (fresh) process: peak extra memory and time of one forward + backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if variant == "unfused-megatron":
        _init_single_rank_world()
    h, weight, labels, mask = _inputs(device, tokens, hidden, vocab)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
    start = time.perf_counter()
    loss = _loss(variant, h, weight, labels, mask)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    return {
        "variant": variant,
        "device": device,
        "peak_extra_mib": round((peak - base) / 2**20, 1),
        "seconds": round(seconds, 2),
        "loss": loss.item(),
        "grad_hidden_norm": h.grad.norm().item(),
        "grad_weight_norm": weight.grad.norm().item(),
    }


def run(tokens: int, hidden: int, vocab: int) -> dict:
    variants = ["unfused-megatron", "unfused-torch", "fused-torch"]
    if torch.cuda.is_available():
        variants.append("fused-triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "kernels")])}
    rows = {}
    for variant in variants:
        command = [sys.executable, __file__, "--measure", variant, "--tokens", str(tokens), "--hidden", str(hidden),
                   "--vocab", str(vocab)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    baseline = rows["unfused-megatron"]
    for row in rows.values():
        row["peak_ratio_to_unfused_megatron"] = round(row["peak_extra_mib"] / baseline["peak_extra_mib"], 3)
        row["loss_rel_diff"] = abs(row["loss"] - baseline["loss"]) / abs(baseline["loss"])
    fused = [row for name, row in rows.items() if name.startswith("fused")]
    return {
        "shape": {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "fp32"},
        "threads": torch.get_num_threads(),
        "variants": rows,
        "target_peak_ratio": TARGET,
        "meets_target": all(row["peak_ratio_to_unfused_megatron"] <= TARGET for row in fused),
    }


def markdown(results: dict) -> str:
    s = results["shape"]
    lines = [
        "# Fused linear + cross-entropy: peak memory vs the unfused logits path",
        "",
        f"{s['tokens']} tokens, hidden {s['hidden']}, vocabulary {s['vocab']:,}, {s['dtype']}, forward + backward, "
        f"one rank, {results['threads']} thread(s). Peak = memory above the inputs at the worst moment "
        "(CPU: VmHWM after resetting it via /proc/self/clear_refs; GPU: max_memory_allocated), each variant "
        "in a fresh process.",
        "",
        "| variant | device | peak extra (MiB) | / unfused-megatron | time (s) | loss rel. diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in results["variants"].items():
        lines.append(
            f"| {name} | {row['device']} | {row['peak_extra_mib']:.0f} | {row['peak_ratio_to_unfused_megatron']:.3f} "
            f"| {row['seconds']:.1f} | {row['loss_rel_diff']:.1e} |"
        )
    verdict = "meets" if results["meets_target"] else "misses"
    lines += ["", f"Fused peak {verdict} the target <= {TARGET:.0%} of the unfused (megatron) peak.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=SHAPE["tokens"])
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.hidden, args.vocab)))
        return
    results = run(args.tokens, args.hidden, args.vocab)
    write_results(args.out, "kernels", results, markdown(results))


if __name__ == "__main__":
    main()
