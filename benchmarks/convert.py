"""Conversion throughput on a random Qwen2.5-0.5B-shaped bf16 checkpoint, against a bare safetensors copy.

Measures, in one run and on the same files:
  bare           read every tensor with safetensors and write them all again (same shards), then fsync: the
                 I/O baseline. Both converters fsync what they write before publishing it (megatron-core's
                 checkpoint writer always does), so the baseline does too; `bare, no fsync` is shown beside it.
  hf-to-mcore    converters.convert.hf_to_mcore at TP1, dtype of the source (bf16)
  mcore-to-hf    converters.convert.mcore_to_hf of that checkpoint back to HF safetensors

Throughput is checkpoint tensor bytes / seconds, best of --repeats; ratio = conversion throughput / bare
throughput, with a target of >= 0.5. The first (cold) run of each converter in the process also pays one-time
costs (importing megatron-core, starting its checkpoint writer's helper process); it is reported separately.
Results go to OUT/convert.json and OUT/convert.md.

    python benchmarks/convert.py                  # full 24-layer model, ~1 GB of bf16 tensors
    python benchmarks/convert.py --layers 2       # quick smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from results_io import write_results  # benchmarks/ is on sys.path when a benchmark runs as a script
from safetensors.torch import load_file, save_file

from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.checkpoint.hf import INDEX_NAME, ShardedSafetensorsWriter
from megatron_swift.fs import fsync_path
from megatron_swift.models.tiny import make_tiny_tokenizer

TARGET_RATIO = 0.5
MAX_SHARD_BYTES = 2 * 1024**3
QWEN2_0_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 21,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "use_cache": True,
}
SEE_REFERENCE = "(see ../shared/reference/megatron-core-on-cpu.md)"
BRIDGES = {  # package: (module, why it is absent here)
    "mcore-bridge": (
        "mcore_bridge",
        "not installed: mcore-bridge 1.6.5 cannot import without transformer_engine and hard-codes device='cuda'",
    ),
    "Megatron-Bridge": (
        "megatron.bridge",
        "not installed: Megatron-Bridge 0.6.2 requires Python >= 3.12 and a CUDA dependency set",
    ),
}


def qwen2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of Qwen2ForCausalLM for `config` (tied embeddings: no lm_head)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.q_proj.bias": (hidden,),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def write_random_checkpoint(out: Path, config: dict, seed: int = 0) -> dict[str, int]:
    """Write config, tokenizer and random bf16 weights (sharded, with index); returns parameter and byte counts."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    make_tiny_tokenizer().save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(out, MAX_SHARD_BYTES)
    params = 0
    for name, shape in qwen2_shapes(config).items():
        writer.add(name, (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16))
        params += torch.Size(shape).numel()
    writer.close()
    return {"parameters": params, "bytes": writer.total_bytes}


def bare_copy(hf_dir: Path, out: Path, durable: bool) -> None:
    """Read every shard with safetensors and write it again under the same name, with the same index."""
    out.mkdir(parents=True)
    for shard in sorted(hf_dir.glob("*.safetensors")):
        save_file(load_file(shard), out / shard.name, metadata={"format": "pt"})
        if durable:
            fsync_path(out / shard.name)
    shutil.copy2(hf_dir / INDEX_NAME, out / INDEX_NAME)


def timed_round_robin(steps: dict[str, Callable[[Path], object]], work: Path, repeats: int) -> dict[str, list[float]]:
    """Wall times of each step over `repeats` rounds, the steps interleaved within each round.

    Interleaving makes every step see the same disk and page-cache conditions (writeback of the previous
    round's files dominates the noise on this machine). Each output dir is recreated before its run.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            step(out)
            times[name].append(time.perf_counter() - start)
    return times


def bridge_status() -> dict[str, str]:
    found = {}
    for package, (module, absent) in BRIDGES.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        found[package] = "installed (not benchmarked here)" if spec else f"{absent} {SEE_REFERENCE}"
    return found


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "megatron-core": package_version("megatron-core"),
        "safetensors": package_version("safetensors"),
        "transformers": package_version("transformers"),
    }


def step_result(times: list[float], nbytes: int, bare_gbps: float | None = None) -> dict:
    best = min(times)
    gbps = nbytes / 1e9 / best
    result = {
        "seconds": round(best, 3),
        "gb_per_s": round(gbps, 4),
        "cold_seconds": round(times[0], 3),
        "all_seconds": [round(t, 3) for t in times],
    }
    if bare_gbps is not None:
        ratio = gbps / bare_gbps
        result.update(ratio=round(ratio, 3), meets_target=ratio >= TARGET_RATIO)
    return result


def run(work: Path, layers: int, repeats: int) -> dict:
    config = {**QWEN2_0_5B, "num_hidden_layers": layers}
    hf_dir = work / "hf"
    sizes = write_random_checkpoint(hf_dir, config)
    mcore_dir = work / "hf-to-mcore"
    times = timed_round_robin(
        {
            "bare": lambda out: bare_copy(hf_dir, out, durable=True),
            "bare, no fsync": lambda out: bare_copy(hf_dir, out, durable=False),
            "hf-to-mcore": lambda out: hf_to_mcore(hf_dir, out),
            "mcore-to-hf": lambda out: mcore_to_hf(mcore_dir, out),
        },
        work,
        repeats,
    )
    bare = step_result(times["bare"], sizes["bytes"])
    return {
        "model": {"shape": "Qwen2.5-0.5B (random weights)", "layers": layers, "dtype": "bf16", **sizes},
        "repeats": repeats,
        "target_ratio": TARGET_RATIO,
        "machine": machine_info(),
        "steps": {
            "bare": bare,
            "bare, no fsync": step_result(times["bare, no fsync"], sizes["bytes"]),
            "hf-to-mcore": step_result(times["hf-to-mcore"], sizes["bytes"], bare["gb_per_s"]),
            "mcore-to-hf": step_result(times["mcore-to-hf"], sizes["bytes"], bare["gb_per_s"]),
        },
        "bridges": bridge_status(),
    }


def markdown(results: dict) -> str:
    model, machine = results["model"], results["machine"]
    lines = [
        "# Conversion benchmark",
        "",
        (
            f"{model['shape']}, {model['layers']} layers, {model['dtype']}: {model['parameters']:,} parameters, "
            f"{model['bytes'] / 1e9:.3f} GB of tensors; best of {results['repeats']}."
        ),
        (
            f"Machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), torch {machine['torch']}, "
            f"megatron-core {machine['megatron-core']}, Python {machine['python']}."
        ),
        "",
        f"| step | best seconds | GB/s | ratio to bare | ratio >= {results['target_ratio']} | first-run seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, step in results["steps"].items():
        ratio = f"{step['ratio']:.3f}" if "ratio" in step else "-"
        meets = ("yes" if step["meets_target"] else "no") if "meets_target" in step else "-"
        lines.append(
            f"| {name} | {step['seconds']:.3f} | {step['gb_per_s']:.3f} | {ratio} | {meets} | "
            f"{step['cold_seconds']:.3f} |"
        )
    lines += ["", "Other converters:", ""]
    lines += [f"- {name}: {status}" for name, status in results["bridges"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--layers", type=int, default=QWEN2_0_5B["num_hidden_layers"])
    args = parser.parse_args()
    if args.work_dir:
        results = run(args.work_dir, args.layers, args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="mswift-bench-") as tmp:
            results = run(Path(tmp), args.layers, args.repeats)
    write_results(args.out_dir, "convert", results, markdown(results))


if __name__ == "__main__":
    main()
