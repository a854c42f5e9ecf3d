"""`python -m converters` / `mswift-convert`: HF <-> megatron-core checkpoints, and a logits check.

    mswift-convert hf-to-mcore --hf DIR --out DIR [--tp N] [--pp N] [--ep N] [--dtype fp32|bf16|fp16]
    mswift-convert mcore-to-hf --mcore DIR --out DIR [--dtype ...] [--workers N]
    mswift-convert check --hf DIR --mcore DIR [--tp N] [--pp N] [--tol 1e-4]

User errors (missing or foreign directories, truncated weights, unsupported architectures, layouts
that do not fit the model) print one `error:` message and exit 2; `check` exits 1 when the logits
differ by more than --tol.
"""

from __future__ import annotations

# Only the standard library at module level: megatron-core's checkpoint writer starts a spawn-context
# helper process that re-imports this module, and torch/megatron imports would cost it seconds.
import argparse
import json
import sys


def _parallel_flags(parser: argparse.ArgumentParser, ep: bool = True) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor model parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline model parallel size")
    if ep:
        parser.add_argument("--ep", type=int, default=1, help="expert model parallel size")


def _parallel(args):
    from megatron_swift.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=getattr(args, "ep", 1),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_mcore = commands.add_parser("hf-to-mcore", help="HF safetensors directory -> megatron-core checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _parallel_flags(to_mcore)
    to_mcore.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the HF weights' dtype")
    to_mcore.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this (must be divisible by every TP you use)",
    )

    to_hf = commands.add_parser("mcore-to-hf", help="megatron-core checkpoint -> HF safetensors directory")
    to_hf.add_argument("--mcore", required=True, help="checkpoint written by hf-to-mcore or training")
    to_hf.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    to_hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's dtype")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=4.0)
    to_hf.add_argument(
        "--workers", type=int, default=1, help="local processes writing disjoint shards (at most one per shard)"
    )
    lora = to_hf.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_const", const="merge", dest="lora",
                      help="LoRA run: write the base model with the adapters merged in")  # fmt: skip
    lora.add_argument("--adapter-only", action="store_const", const="adapter", dest="lora",
                      help="LoRA run: write a PEFT adapter (HF module names) only")  # fmt: skip

    check = commands.add_parser("check", help="compare HF and megatron-core logits on the same tokens (fp32)")
    check.add_argument("--hf", required=True)
    check.add_argument("--mcore", required=True)
    _parallel_flags(check)
    check.add_argument("--tol", type=float, default=1e-4, help="maximum allowed |logit difference|")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seq", type=int, default=32)
    check.add_argument("--seed", type=int, default=0)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from converters.check import check
    from converters.convert import hf_to_mcore, mcore_to_hf

    if args.command == "hf-to-mcore":
        out = hf_to_mcore(args.hf, args.out, _parallel(args), args.dtype, args.make_vocab_size_divisible_by)
        print(f"wrote megatron-core checkpoint: {out}")
    elif args.command == "mcore-to-hf":
        max_shard_bytes = int(args.max_shard_size_gb * 1024**3)
        out = mcore_to_hf(args.mcore, args.out, args.dtype, max_shard_bytes, args.lora, args.workers)
        print(f"wrote {'PEFT adapter' if args.lora == 'adapter' else 'HF checkpoint'}: {out}")
    else:
        result = check(args.hf, args.mcore, _parallel(args), args.batch, args.seq, args.seed)
        print(json.dumps(result))
        if result["max_abs_diff"] > args.tol:
            print(f"error: max_abs_diff {result['max_abs_diff']:.3g} exceeds --tol {args.tol:g}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    from megatron_swift.checkpoint.hf import CheckpointError
    from megatron_swift.config import ConfigError
    from megatron_swift.distributed import WorkerError
    from megatron_swift.models import UnsupportedModelError

    try:
        return run(argv)
    except (CheckpointError, ConfigError, UnsupportedModelError, WorkerError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
