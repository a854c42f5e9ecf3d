"""`python -m megatron_swift.serve` / `mswift-serve`: serve an HF directory (+ LoRA adapters) with vLLM.

    mswift-serve --model HF_DIR [--adapter NAME=DIR ...] [--tensor-parallel-size N] [--max-model-len N]
                 [--served-model-name NAME] [--host H] [--port P] [--dtype D] [--dry-run] [-- VLLM_ARGS...]

Checks the export (config, tokenizer, generation config, tensor names) and every adapter, builds the
`vllm serve` command (OpenAI-compatible API) and replaces this process with it. Without vLLM or a
CUDA GPU it prints why and the command it would run, and exits 2; --dry-run only prints the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model directory (an mcore-to-hf export)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR of a PEFT LoRA adapter (repeat)")
    parser.add_argument("--served-model-name", help="model name in the API (default: the directory)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--max-lora-rank", type=int, help="default: the smallest vLLM rank that fits the adapters")
    parser.add_argument("--max-loras", type=int)
    parser.add_argument("--dry-run", action="store_true", help="check and print the command, do not start vLLM")
    parser.add_argument("--skip-export-check", action="store_true")
    parser.add_argument("extra_args", nargs=argparse.REMAINDER, help="after `--`: passed to vllm serve as is")
    return parser


def prepare(argv: list[str] | None = None):
    """(command, problems, dry run) for the arguments; problems are what stops serving."""
    from megatron_swift.serve.command import ServeConfig, build_vllm_command, lora_rank_for
    from megatron_swift.serve.export_check import check_adapter, check_export

    args = vars(build_parser().parse_args(argv))
    dry_run, skip_check, specs = args.pop("dry_run"), args.pop("skip_export_check"), args.pop("adapter")
    extra = args.pop("extra_args")
    problems, adapters, ranks = [], {}, []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in adapters:
            problems.append(f"--adapter {spec!r}: give NAME=DIR with a unique NAME")
            continue
        adapter_problems, rank = check_adapter(path)
        problems += adapter_problems
        adapters[name] = path
        ranks += [rank] if rank else []
    config = ServeConfig(adapters=adapters, extra_args=extra[1:] if extra[:1] == ["--"] else extra, **args)
    if config.max_lora_rank is None and ranks:
        try:
            config.max_lora_rank = lora_rank_for(ranks)
        except ValueError as exc:
            problems.append(str(exc))
    elif ranks and max(ranks) > config.max_lora_rank:
        problems.append(f"--max-lora-rank {config.max_lora_rank} is below an adapter's rank {max(ranks)}")
    problems += config.problems()
    if not skip_check:
        problems += check_export(config.model)
    return build_vllm_command(config), problems, dry_run


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    from megatron_swift._optional import vllm_unavailable_reason

    command, problems, dry_run = prepare(argv)
    rendered = shlex.join(command)
    if problems:
        print("error: not serving:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if dry_run:
        print(rendered)
        return 0
    reason = vllm_unavailable_reason()
    if reason:
        print(f"error: cannot start vLLM: {reason}\nthe command would be:\n  {rendered}", file=sys.stderr)
        return 2
    print(rendered, flush=True)
    os.execvp(command[0], command)  # vLLM owns the process (signals, exit code) from here on
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
