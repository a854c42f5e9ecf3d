"""`python -m megatron_swift.eval` / `mswift-eval`: evaluate one or more HF models side by side.

    mswift-eval --model base=HF_DIR --model tuned=HF_DIR2 \\
        [--perplexity DATA.jsonl [--task sft|pretrain] [--seq-length N]] \\
        [--qa QA.jsonl] [--agent AGENT.jsonl] [--max-new-tokens N] [--backend hf|vllm] \\
        [--skip-bad-rows] --out REPORT_DIR

Writes REPORT_DIR/report.json, REPORT_DIR/report.md (printed too) and the predictions of each model.
QA rows may carry images (`images` + `<image>` tags, as training rows): a vision-language model generates them
through its own processor (--backend hf).
Without --model, QA / agent rows are scored from their own "prediction" fields. Bad input (missing
directories, malformed rows with file:line, vLLM without a GPU) prints one `error:` line and exits 2;
with --skip-bad-rows, malformed rows are skipped instead. Rows left out (skipped, or agent rows whose
reference turn cannot be read) are counted in report.json's `data` section and in a summary line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_models(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory) -> {name: dir}; names must be unique."""
    from megatron_swift.eval.loading import EvalInputError

    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path or name in models:
            raise EvalInputError(f"--model {spec!r}: give NAME=DIR with a unique NAME")
        models[name] = path
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="NAME=HF_DIR (repeat to compare models)")
    parser.add_argument("--perplexity", dest="perplexity_data", help="JSONL in the training format")
    parser.add_argument("--task", default="sft", choices=["sft", "pretrain"], help="loss mask as in training")
    parser.add_argument("--seq-length", type=int, default=2048, help="samples are cut to this, as in training")
    parser.add_argument("--qa", dest="qa_data", help="JSONL of QA rows (+ images); exact + normalised match")
    parser.add_argument("--agent", dest="agent_data", help="JSONL of tool-calling steps (Act.EM, Plan.EM, ...)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="generation engine")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (vllm backend)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", help="torch device for the transformers backend")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows (else stop)")
    parser.add_argument("--out", default="eval_report", help="report directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    from megatron_swift.data import DataError
    from megatron_swift.eval.loading import EvalInputError
    from megatron_swift.eval.report import write_report
    from megatron_swift.eval.suite import EvalConfig, evaluate

    args = vars(build_parser().parse_args(argv))
    try:
        config = EvalConfig(models=parse_models(args.pop("model")), **args)
        report = evaluate(config)
    except (EvalInputError, DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(write_report(config.out, report))
    print(f"wrote {Path(config.out) / 'report.json'} and report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
