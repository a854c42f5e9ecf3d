"""Conversion throughput and memory on a random Qwen2-shaped bf16 checkpoint, against a bare safetensors copy.

Measures, in one run and on the same files, each step both ways:
  cold           fresh processes, as users run them: `python -m converters hf-to-mcore` / `mcore-to-hf`, and the
                 bare copy as a `python -c` that imports torch + safetensors. Includes imports and start-up;
                 each process's peak RSS (of it and its children, whichever is largest) is recorded.
  warm           in this process (converters.convert.hf_to_mcore / mcore_to_hf), after a first run paid the
                 one-time costs (imports, megatron-core initialisation).
Steps:
  bare           read every tensor with safetensors and write them all again (same shards), then fsync: the
                 I/O baseline. Both converters fsync what they write before publishing it (megatron-core's
                 checkpoint writer always does), so the baseline does too; `bare, no fsync` (warm) beside it.
  hf-to-mcore    at TP1, dtype of the source (bf16)
  mcore-to-hf    that checkpoint back to HF safetensors (the streaming exporter, one process)
  round trip     hf-to-mcore + mcore-to-hf against two bare copies

Throughput is checkpoint tensor bytes / seconds, best of --repeats; ratio = bare seconds / step seconds (per
direction, and for the round trip), with a target of >= 0.5. Peak RSS / model bytes comes from the cold runs.
Results go to OUT/convert.{json,md} (OUT/convert-SHAPE.{json,md} for another --shape).

    python benchmarks/convert.py                       # Qwen2.5-0.5B shape, ~1 GB of bf16 tensors
    python benchmarks/convert.py --shape qwen2-1.5b    # the issue's 3.1 GB checkpoint
    python benchmarks/convert.py --shape deepseek-v3-0.5gb   # MoE + MLA: 2,361 tensors, mostly experts
    python benchmarks/convert.py --layers 2 --repeats 1   # quick smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from results_io import write_results  # benchmarks/ is on sys.path when a benchmark runs as a script
from safetensors.torch import load_file, save_file

import converters
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
QWEN2_1_5B = {**QWEN2_0_5B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "max_window_layers": 28, "sliding_window": 32768}  # fmt: skip
# DeepSeek-V3's config with every width / 16 (hidden, FFN, MoE FFN, heads, latent ranks, head sizes) and its counts
# kept (256 experts, top-8 in the best 4 of 8 groups, 1 shared expert, vocabulary): each MoE layer's routed experts
# are then 1/256 of the real layer's; 1 dense + 3 MoE layers make ~0.5 GB.
DEEPSEEK_V3_SMALL = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 448,
    "intermediate_size": 1152, "moe_intermediate_size": 128, "num_hidden_layers": 4, "first_k_dense_replace": 1,
    "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 96, "kv_lora_rank": 32,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "vocab_size": 129280,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "hidden_act": "silu", "torch_dtype": "bfloat16", "attention_bias": False, "attention_dropout": 0.0,
    "initializer_range": 0.02, "num_nextn_predict_layers": 0, "bos_token_id": 0, "eos_token_id": 1, "use_cache": True,
}  # fmt: skip
SHAPES = {
    "qwen2-0.5b": ("Qwen2.5-0.5B", QWEN2_0_5B),
    "qwen2-1.5b": ("Qwen2-1.5B", QWEN2_1_5B),
    "deepseek-v3-0.5gb": ("DeepSeek-V3 widths / 16, 1 dense + 3 MoE layers of 256 experts", DEEPSEEK_V3_SMALL),
}
# Fresh processes import the same checkout this process does (PYTHONPATH may point at another one).
ROOT = Path(converters.__file__).resolve().parents[1]
# The bare copy as a fresh process: only what reading and writing safetensors needs.
BARE_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard), out / shard.name, metadata={"format": "pt"})
    fd = os.open(out / shard.name, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
shutil.copy2(src / "model.safetensors.index.json", out / "model.safetensors.index.json")
"""
# Runs `-m MODULE ARGS` or `-c CODE ARGS` in this process and, at exit, writes its peak RSS and CPU seconds
# (user + system, its own and its children's) to $MSWIFT_BENCH_RSS.
# Read inside: the rusage a parent gets from wait4 also counts the parent's own peak at the spawn (Linux records
# the pre-exec memory's high-water mark), which would credit every step with this benchmark's memory.
PEAK_RSS_WRAPPER = """
import atexit, json, os, resource, runpy, sys

def report():
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime  # children: checkpoint writers
    with open(os.environ["MSWIFT_BENCH_RSS"], "w") as out:
        json.dump({"rss": 1024 * max(peak, children.ru_maxrss), "cpu": cpu}, out)

atexit.register(report)
kind, target = sys.argv[1:3]
if kind == "-m":
    sys.argv = [target, *sys.argv[3:]]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
"""
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


def deepseek_v3_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of DeepseekV3ForCausalLM on disk (per-expert tensors, untied lm_head)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    q_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}

    def mlp(prefix: str, ffn: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (ffn, hidden), f"{prefix}.up_proj.weight": (ffn, hidden),
                       f"{prefix}.down_proj.weight": (hidden, ffn)})  # fmt: skip

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_a_proj.weight": (config["q_lora_rank"], hidden),
                p + "self_attn.q_a_layernorm.weight": (config["q_lora_rank"],),
                p + "self_attn.q_b_proj.weight": (heads * q_head, config["q_lora_rank"]),
                p + "self_attn.kv_a_proj_with_mqa.weight": (
                    config["kv_lora_rank"] + config["qk_rope_head_dim"],
                    hidden,
                ),
                p + "self_attn.kv_a_layernorm.weight": (config["kv_lora_rank"],),
                p + "self_attn.kv_b_proj.weight": (
                    heads * (config["qk_nope_head_dim"] + config["v_head_dim"]),
                    config["kv_lora_rank"],
                ),
                p + "self_attn.o_proj.weight": (hidden, heads * config["v_head_dim"]),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
        if i < config["first_k_dense_replace"]:
            mlp(p + "mlp", config["intermediate_size"])
            continue
        experts, ffn = config["n_routed_experts"], config["moe_intermediate_size"]
        shapes[p + "mlp.gate.weight"] = (experts, hidden)
        shapes[p + "mlp.gate.e_score_correction_bias"] = (experts,)
        for expert in range(experts):
            mlp(f"{p}mlp.experts.{expert}", ffn)
        mlp(p + "mlp.shared_experts", ffn * config["n_shared_experts"])
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def write_random_checkpoint(out: Path, config: dict, seed: int = 0) -> dict[str, int]:
    """Write config, tokenizer and random bf16 weights (sharded, with index); returns parameter and byte counts."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    make_tiny_tokenizer().save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(out, MAX_SHARD_BYTES)
    params = 0
    shapes = deepseek_v3_shapes(config) if config["model_type"] == "deepseek_v3" else qwen2_shapes(config)
    for name, shape in shapes.items():
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


@dataclass(frozen=True)
class Run:
    seconds: float  # wall clock
    cpu_seconds: float  # user + system, the process's and its children's: less sensitive to a shared machine
    rss_bytes: int | None = None  # peak RSS, measured for fresh processes only


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_round_robin(steps: dict[str, Callable[[Path], object]], work: Path, repeats: int) -> dict[str, list[Run]]:
    """Each step's runs over `repeats` rounds, the steps interleaved within each round; a step that runs a fresh
    process returns its own `Run`, an in-process step is timed here.

    Interleaving makes every step see the same disk and page-cache conditions (writeback of the previous
    round's files dominates the noise on this machine). Each output dir is recreated before its run and,
    unless another step reads it (`KEEP`), removed after it, so the disk holds a few copies at most.
    """
    results: dict[str, list[Run]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            start, cpu = time.perf_counter(), _cpu_seconds()
            measured = step(out)
            if not isinstance(measured, Run):
                measured = Run(time.perf_counter() - start, _cpu_seconds() - cpu)
            results[name].append(measured)
            if name not in KEEP:
                shutil.rmtree(out, ignore_errors=True)
    return results


KEEP = {"warm hf-to-mcore", "cold hf-to-mcore"}  # read by the mcore-to-hf steps


def fresh_process(argv: list[str]) -> Run:
    """A new Python process running `argv` from the repository root, with the checkout this process imported
    first on the path. The RSS is the largest of the process and its waited-for children."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w+b") as log:
        report = Path(tmp) / "report"
        path = [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "MSWIFT_BENCH_RSS": str(report)}
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *argv], cwd=ROOT, env=env, stdout=log,
                              stderr=log).returncode  # fmt: skip
        seconds = time.perf_counter() - start
        if code:
            log.seek(0)
            raise RuntimeError(f"{argv[:3]} exited {code}:\n{log.read().decode()[-3000:]}")
        measured = json.loads(report.read_text())
        return Run(seconds, measured["cpu"], measured["rss"])


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


def step_result(runs: list[Run], nbytes: int, bare: dict | None = None) -> dict:
    """Best wall and CPU seconds of the runs; ratios against the bare copy's best (bare seconds / step seconds)."""
    best, cpu = min(r.seconds for r in runs), min(r.cpu_seconds for r in runs)
    result = {
        "seconds": round(best, 3),
        "gb_per_s": round(nbytes / 1e9 / best, 4),
        "cpu_seconds": round(cpu, 3),
        "first_run_seconds": round(runs[0].seconds, 3),
        "all_seconds": [round(r.seconds, 3) for r in runs],
    }
    if bare is not None:
        ratio = bare["seconds"] / best
        result.update(ratio=round(ratio, 3), meets_target=ratio >= TARGET_RATIO,
                      cpu_ratio=round(bare["cpu_seconds"] / cpu, 3))  # fmt: skip
    rss = [r.rss_bytes for r in runs if r.rss_bytes is not None]
    if rss:
        result.update(peak_rss_bytes=max(rss), peak_rss_per_model_byte=round(max(rss) / nbytes, 3))
    return result


def _round_trip(there: list[Run], back: list[Run]) -> list[Run]:
    return [Run(a.seconds + b.seconds, a.cpu_seconds + b.cpu_seconds) for a, b in zip(there, back, strict=True)]


def run(work: Path, shape: str, layers: int | None, repeats: int) -> dict:
    name, base = SHAPES[shape]
    config = {**base, "num_hidden_layers": layers or base["num_hidden_layers"]}
    hf_dir = work / "hf"
    sizes = write_random_checkpoint(hf_dir, config)
    to_mcore, to_hf = ["-m", "converters", "hf-to-mcore", "--hf"], ["-m", "converters", "mcore-to-hf", "--mcore"]
    cold = timed_round_robin(
        {
            "cold bare": lambda out: fresh_process(["-c", BARE_SCRIPT, str(hf_dir), str(out)]),
            "cold hf-to-mcore": lambda out: fresh_process([*to_mcore, str(hf_dir), "--out", str(out)]),
            "cold mcore-to-hf": lambda out: fresh_process([*to_hf, str(work / "cold hf-to-mcore"), "--out", str(out)]),
        },
        work,
        repeats,
    )
    warm = timed_round_robin(
        {
            "warm bare": lambda out: bare_copy(hf_dir, out, durable=True),
            "warm bare, no fsync": lambda out: bare_copy(hf_dir, out, durable=False),
            "warm hf-to-mcore": lambda out: hf_to_mcore(hf_dir, out),
            "warm mcore-to-hf": lambda out: mcore_to_hf(work / "warm hf-to-mcore", out),
        },
        work,
        repeats + 1,  # the first round pays the in-process one-time costs
    )
    nbytes = sizes["bytes"]
    results = {}
    for mode, measured in (("cold", cold), ("warm", warm)):
        runs = {step.removeprefix(f"{mode} "): found for step, found in measured.items()}
        steps = {"bare": step_result(runs["bare"], nbytes)}
        if "bare, no fsync" in runs:
            steps["bare, no fsync"] = step_result(runs["bare, no fsync"], nbytes)
        for step in ("hf-to-mcore", "mcore-to-hf"):
            steps[step] = step_result(runs[step], nbytes, steps["bare"])
        twice = {"seconds": 2 * steps["bare"]["seconds"], "cpu_seconds": 2 * steps["bare"]["cpu_seconds"]}
        steps["round trip"] = step_result(_round_trip(runs["hf-to-mcore"], runs["mcore-to-hf"]), 2 * nbytes, twice)
        results[mode] = steps
    return {
        "model": {"shape": f"{name} (random weights)", "layers": config["num_hidden_layers"], "dtype": "bf16", **sizes},
        "repeats": repeats,
        "target_ratio": TARGET_RATIO,
        "machine": machine_info(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cold": results["cold"],
        "warm": results["warm"],
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
            f"megatron-core {machine['megatron-core']}, Python {machine['python']}; load average at the end "
            f"{' / '.join(map(str, results['load_average']))} (1 / 5 / 15 min; shared machine)."
        ),
        "",
        "Cold: fresh processes, as users run them (imports and start-up included). Warm: in-process, after a first",
        "run. Ratio = bare seconds / step seconds (round trip: two bare copies / both directions); CPU ratio the",
        "same with CPU seconds (user + system, children included), which a busy shared machine distorts less.",
        "",
        "| step | cold s | cold ratio | warm s | warm ratio | ratio >= 0.5 (cold / warm) | CPU ratio (cold / warm) "
        "| peak RSS GB (cold) | peak RSS / model bytes |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for name in ("bare", "bare, no fsync", "hf-to-mcore", "mcore-to-hf", "round trip"):
        cold, warm = results["cold"].get(name), results["warm"].get(name)
        cells = [name]
        for step in (cold, warm):
            cells += [f"{step['seconds']:.2f}", f"{step.get('ratio', '-')}"] if step else ["-", "-"]
        measured = [s for s in (cold, warm) if s and "ratio" in s]
        cells.append("/".join("yes" if s["meets_target"] else "no" for s in measured) or "-")
        cells.append(" / ".join(str(s["cpu_ratio"]) for s in measured) or "-")
        rss = (cold or {}).get("peak_rss_bytes")
        cells += [f"{rss / 1e9:.2f}", f"{cold['peak_rss_per_model_byte']:.2f}"] if rss else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Other converters:", ""]
    lines += [f"- {name}: {status}" for name, status in results["bridges"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--layers", type=int, help="default: the shape's")
    args = parser.parse_args()
    if args.work_dir:
        results = run(args.work_dir, args.shape, args.layers, args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="mswift-bench-") as tmp:
            results = run(Path(tmp), args.shape, args.layers, args.repeats)
    name = "convert" if args.shape == "qwen2-0.5b" else f"convert-{args.shape}"  # the default keeps its old name
    write_results(args.out_dir, name, results, markdown(results))


if __name__ == "__main__":
    main()
