"""`mswift-plan` / `python -m megatron_swift.plan`: memory and step-time estimates before launch.

    mswift-plan --config JOB.yaml [--gpus-per-node 8] [--nodes N] [--gpu h100|h200|a100|a800|...]
        [--gpu-memory-gb GIB] [--json] [--search [--top N]] [--section.field value ...]

For the job as written: per pipeline stage, the rank with the most memory (weights, gradients, optimizer
states, activations) against the device's memory, and an estimated step time and MFU. `--json` prints one
JSON object (`ranks`: rank, pp_stage, weights_bytes, grads_bytes, optimizer_bytes, activations_bytes,
total_bytes, ...; `step_time_s`; `mfu`). `--search` enumerates layouts for the model and world, keeps
those preflight accepts and that fit, and prints the fastest with the overrides that select them.
`--section.field value` overrides the job exactly as the launcher takes them. The job is checked as the
launcher checks it (preflight), except for files: only the model's config.json is read. A bad file, field
or job prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML job file (as for launch/pretrain_sft.py)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu", default="h100", help="device kind: h100, h800, h200, h20, b200, a100, a800, l40s")
    parser.add_argument("--gpu-memory-gb", type=float, help="device memory in GiB (default: the device's)")
    parser.add_argument(
        "--reserve-gb",
        type=float,
        default=4.0,
        help="GiB per GPU the estimate does not see (CUDA context, NCCL, fragmentation)",
    )
    parser.add_argument("--compute-efficiency", type=float, default=0.5, help="achieved / peak FLOP/s of matmuls")
    parser.add_argument("--comm-efficiency", type=float, default=0.8, help="achieved / nominal link bandwidth")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--search", action="store_true", help="rank the layouts that fit, fastest first")
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    known, overrides = build_parser().parse_known_args(argv)
    from megatron_swift.checkpoint.hf import CheckpointError, load_hf_config
    from megatron_swift.config import ConfigError, load_config
    from megatron_swift.models import UnsupportedModelError, translate
    from megatron_swift.plan.estimate import estimate
    from megatron_swift.plan.hardware import Cluster, device_named
    from megatron_swift.plan.report import render
    from megatron_swift.plan.search import schedule_problems, search
    from megatron_swift.training.config import JobConfig, preflight
    from megatron_swift.training.job import model_source

    if known.gpus_per_node < 1 or known.nodes < 1:
        return _fail("--gpus-per-node and --nodes must be >= 1")
    try:
        device = device_named(known.gpu, known.gpu_memory_gb)
    except KeyError as exc:
        return _fail(f"--gpu: {exc.args[0]}")
    cluster = Cluster(
        device, known.gpus_per_node, known.nodes, known.compute_efficiency, known.comm_efficiency, known.reserve_gb
    )
    world = cluster.world_size
    try:
        job = load_config(JobConfig, known.config, overrides)
        source = model_source(job)
        args = translate(load_hf_config(source), make_vocab_size_divisible_by=job.model.make_vocab_size_divisible_by)
    except (ConfigError, CheckpointError, UnsupportedModelError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or known.config}: {exc.strerror or exc}")
    if known.search:
        return _search(job, args, cluster, known, search)
    problems = preflight(job, world, args) + schedule_problems(job, world)
    if problems:
        return _fail(f"{len(problems)} problem(s) in the job at world size {world}: " + "; ".join(problems))
    result = estimate(job, world, args, cluster)
    if known.json:
        print(json.dumps(result.to_json()))
        return 0
    title = f"{source.name}: {args.family.name}, {_params(args) / 1e9:.1f}B parameters, on {world} x {device.name}"
    print(render(result, title))
    return 0


def _params(args) -> int:
    """Total parameters (whole model) from the planner's inventory at TP1 / EP1."""
    from megatron_swift.config import ParallelConfig
    from megatron_swift.plan.layout import Layout, Ops, Target
    from megatron_swift.plan.params import Inventory
    from megatron_swift.training.config import JobConfig

    job = JobConfig(parallel=ParallelConfig())
    lay = Layout.from_job(job, 1, args)
    inventory = Inventory(args, lay, Ops.resolve(job, Target()), None)
    return sum(int(inventory.chunk(c).numel.sum()) for c in lay.chunks)


def _search(job, args, cluster, known, search) -> int:
    started = time.perf_counter()
    found, accepted = search(job, args, cluster)
    elapsed = time.perf_counter() - started
    top = found[: known.top]
    if known.json:
        print(
            json.dumps(
                {
                    "world_size": cluster.world_size,
                    "accepted": accepted,
                    "fitting": len(found),
                    "seconds": round(elapsed, 2),
                    "layouts": [dict(c.estimate.to_json(), overrides=c.overrides()) for c in top],
                }
            )
        )
        return 0
    from megatron_swift.plan.report import gib, layout_line

    print(
        f"{accepted} layouts pass preflight on {cluster.world_size} x {cluster.device.name}, {len(found)} fit in "
        f"{gib(cluster.usable_bytes)} GiB ({cluster.reserve_gib:.0f} GiB reserved); searched in {elapsed:.1f} s"
    )
    for index, candidate in enumerate(top, 1):
        est = candidate.estimate
        print(
            f"{index:>2}. {est.time.step_s:.2f} s/step, MFU {100 * est.time.mfu:.0f}%, peak {gib(est.peak_bytes)} GiB: "
            f"{layout_line(est)}"
        )
        print("    " + " ".join(candidate.overrides()))
    if not found:
        print("no layout fits: more GPUs, LoRA, a shorter sequence or a smaller global batch")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
