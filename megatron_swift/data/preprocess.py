"""Pretraining corpus -> Megatron indexed data (PREFIX.bin + PREFIX.idx), read by megatron-core's IndexedDataset.

    python -m megatron_swift.data.preprocess --input a.jsonl [b.parquet ...] --output-prefix data/corpus \\
        --tokenizer HF_DIR [--workers N] [--skip-bad-rows]

Each text row ({"text": ...}; JSONL, JSON, Parquet, CSV or a datasets dir) becomes one document
ending with EOD (the tokenizer's EOS). The output appears only once complete (temp files renamed).
"""

from __future__ import annotations

import argparse
import itertools
import sys

from megatron_swift.data.encode import Encoder, encode_rows
from megatron_swift.data.errors import BadRows, DataError
from megatron_swift.data.indexed import write_indexed
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import DatasetSpec, check_exists, iter_rows


def preprocess(inputs: list[str], output_prefix: str, tokenizer, workers: int = 1, skip_bad_rows: bool = False,
               progress: bool = False) -> dict:  # fmt: skip
    """Tokenize every text row of `inputs` into OUTPUT_PREFIX.{bin,idx}; returns counts."""
    paths = [DatasetSpec.parse(spec).path for spec in inputs]
    for path in paths:  # every input is checked before anything is written
        check_exists(path)
    bad = BadRows(skip=skip_bad_rows)
    encoder = Encoder(tokenizer, None, LossPolicy(), "text", "pretrain")
    rows = itertools.chain.from_iterable(iter_rows(path, bad) for path in paths)
    tokens = 0

    def documents():
        nonlocal tokens
        for row, result in encode_rows(encoder, rows, workers, progress):
            if isinstance(result, str):
                bad.report(row.where, result)
                continue
            tokens += len(result.ids)
            yield result.ids

    written = write_indexed(output_prefix, documents(), len(tokenizer))
    if not written:
        raise DataError(f"{', '.join(inputs)}: no documents")
    return {"documents": written, "tokens": tokens, "bad_rows": bad.count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text datasets (files or datasets dirs)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    parser.add_argument("--workers", type=int, default=1, help="tokenization processes")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        counts = preprocess(args.input, args.output_prefix, AutoTokenizer.from_pretrained(args.tokenizer),
                            args.workers, args.skip_bad_rows, progress=True)  # fmt: skip
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
