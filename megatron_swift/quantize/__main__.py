"""`python -m megatron_swift.quantize` / `mswift-quantize`: post-training quantization of an HF directory.

    mswift-quantize --model HF_DIR --out OUT_DIR [--method int8|gptq|awq|fp8]
                    [--eval-data DATA.jsonl [--task sft|pretrain] [--seq-length N]] [--calibration DATA.jsonl]

int8 (torchao weight-only) runs on CPU; gptq, awq and fp8 need a CUDA GPU and their libraries and
are refused with a message saying which. OUT_DIR gets the quantized model (loadable with
`from_pretrained`) and report.json / report.md: size on disk and perplexity before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from megatron_swift.quantize.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="mswift-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--method", default="int8", choices=list(METHODS))
    parser.add_argument("--eval-data", help="JSONL in the training format: perplexity before/after")
    parser.add_argument("--task", default="sft", choices=["sft", "pretrain"])
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--calibration", help="JSONL (text or messages rows) for gptq / awq")
    parser.add_argument("--device", default="cpu", help="torch device for the perplexity measurements")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_swift.quiet import silence_known_noise

    silence_known_noise()
    from megatron_swift.data import DataError
    from megatron_swift.eval.loading import EvalInputError
    from megatron_swift.quantize.run import QuantizeError, quantize_model

    args = build_parser().parse_args(argv)
    try:
        report = quantize_model(
            args.model, args.out, args.method, args.eval_data, args.calibration, args.task, args.seq_length, args.device
        )
    except (QuantizeError, EvalInputError, DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text())
    print(f"size ratio {report['size_ratio']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
