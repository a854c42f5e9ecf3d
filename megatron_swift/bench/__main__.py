"""`python -m megatron_swift.bench techniques`: run one job under several techniques and compare them.

    python -m megatron_swift.bench techniques --config JOB.yaml --techniques full,lora,rslora,dora \\
        [--technique 'mine=--lora.rank 4 --lora.alpha 8'] [--steps N] [--warmup K] \\
        [--eval-agent AGENT.jsonl | --eval-qa QA.jsonl] [--out DIR] [--section.field value ...]

Each technique is the real training job (torchrun + launch/pretrain_sft.py) on the same data, steps and seed,
in OUT/runs/NAME; trailing `--section.field value` pairs apply to every run. Writes OUT/techniques.{json,md,png}.
Bad input (an unknown technique, a field no job has, a missing file) prints one `error:` and exits 2 before any
run; a technique whose run fails gets a failed row with its stderr's tail, and the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from megatron_swift.bench.techniques import known_names

    parser = argparse.ArgumentParser(prog="python -m megatron_swift.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("techniques", help="compare techniques on one job")
    t.add_argument("--config", required=True, help="the job YAML (as for launch/pretrain_sft.py)")
    t.add_argument("--techniques", action="append", default=[],
                   help=f"comma-separated names, '+' combines them; known: {', '.join(known_names())}")  # fmt: skip
    t.add_argument(
        "--technique",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a technique of your own: NAME='--section.field value ...' (add --nproc N for a layout)",
    )
    t.add_argument("--steps", type=int, help="train.train_iters for every run (default: the job's)")
    t.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    t.add_argument("--eval-agent", help="agent JSONL: export each run and score it with mswift-eval --agent")
    t.add_argument("--eval-qa", help="QA JSONL: export each run and score it with mswift-eval --qa")
    t.add_argument("--max-new-tokens", type=int, default=64, help="generation length for the eval set")
    t.add_argument("--eval-batch-size", type=int, default=32, help="generation batch size for the eval set")
    t.add_argument("--out", type=Path, default=Path("outputs/techniques"), help="results directory")
    t.add_argument("--launcher", type=Path, help="the training entry point (default: launch/pretrain_sft.py)")
    t.add_argument("--timeout", type=float, help="seconds before a run is stopped and reported failed")
    t.add_argument("--no-plots", action="store_true", help="JSON and Markdown only (no matplotlib needed)")
    return parser


def _check_inputs(args, plan) -> list[str]:
    from megatron_swift._optional import MissingExtraError, require

    problems = []
    for option, path in (("--eval-agent", args.eval_agent), ("--eval-qa", args.eval_qa)):
        if path and not Path(path).is_file():
            problems.append(f"{option} {path}: no such file")
    if not args.launcher.is_file():
        problems.append(f"--launcher {args.launcher}: no such file (the training entry point, launch/pretrain_sft.py)")
    if args.out.exists() and not args.out.is_dir():
        problems.append(f"--out {args.out}: not a directory")
    if args.warmup < 0 or (args.steps is not None and args.steps < 1):
        problems.append("--warmup must be >= 0 and --steps >= 1")
    if not args.no_plots:
        try:
            require("matplotlib")
        except MissingExtraError as exc:
            problems.append(str(exc))
    return problems


def run_techniques(args) -> int:
    from tqdm import tqdm

    from megatron_swift.bench import report
    from megatron_swift.bench.runner import RunSettings, default_launcher, run_technique
    from megatron_swift.bench.techniques import plan_runs
    from megatron_swift.config import ConfigError, load_config
    from megatron_swift.training.config import JobConfig

    args.launcher = args.launcher or default_launcher()
    common = list(args.common_overrides) + (["--train.train_iters", str(args.steps)] if args.steps else [])
    try:
        plan = plan_runs(args.config, args.techniques, args.technique, common)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = _check_inputs(args, plan)
    if problems:
        print("error: " + "\n  ".join([f"{len(problems)} problem(s):", *problems]), file=sys.stderr)
        return 2
    settings = RunSettings(args.out, args.launcher, args.warmup, args.eval_agent, args.eval_qa, args.max_new_tokens,
                           args.eval_batch_size, args.timeout)  # fmt: skip
    base_job = load_config(JobConfig, args.config, common)
    rows = []
    bar = tqdm(plan.techniques, desc="techniques", unit="run")
    for technique in bar:
        bar.set_postfix(running=technique.name)
        job = load_config(JobConfig, args.config, [*common, *technique.overrides])
        row = run_technique(technique, plan.nproc[technique.name], args.config, common,
                            job.train.train_type == "lora", settings)  # fmt: skip
        rows.append(row)
        bar.write(
            f"{technique.name}: {row['status']}" + (f" ({row['wall_seconds']} s)" if "wall_seconds" in row else "")
        )
    kinds = {row["peak_memory_kind"] for row in rows if "peak_memory_kind" in row}
    results = {
        "config": args.config,
        "common_overrides": common,
        "train_iters": base_job.train.train_iters,
        "seed": base_job.train.seed,
        "warmup": args.warmup,
        "memory_kind": {"cuda_max_allocated": "CUDA max allocated", "peak_rss": "peak RSS"}.get(
            kinds.pop() if len(kinds) == 1 else "", "mixed" if kinds else "none measured"
        ),
        "eval": {"agent": args.eval_agent, "qa": args.eval_qa},
        "rows": rows,
    }
    written = report.write(results, args.out, plots=not args.no_plots)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    args, common = build_parser().parse_known_args(argv)
    bad = [token for token in common if token.startswith("-") and not token.startswith("--")]
    if bad:
        print(f"error: unknown option(s) {' '.join(bad)}", file=sys.stderr)
        return 2
    args.common_overrides = common
    return run_techniques(args)


if __name__ == "__main__":
    sys.exit(main())
