"""Write a tiny random HF model + tiny trained tokenizer for one family (or all), with no hub access.

python examples/make_tiny_model.py --family llama --out /tmp/tiny-llama
python examples/make_tiny_model.py --family all --out /tmp/tiny   # /tmp/tiny/<family>
python examples/make_tiny_model.py --family llama --out DIR --tokenizer-corpus TEXT --tokenizer-vocab 1024 \
    --config hidden_size=256 --config vocab_size=1024   # sized up, tokenizer trained on a task's text
"""

import argparse
from pathlib import Path

from megatron_swift.quiet import silence_known_noise


def main() -> None:
    silence_known_noise()  # before torch / torchao are imported
    import torch

    from megatron_swift.models import all_families
    from megatron_swift.models.tiny import make_tiny_model

    names = sorted(all_families())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=[*names, "all"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-corpus", type=Path, help="train the tokenizer on this text file instead")
    parser.add_argument("--tokenizer-vocab", type=int, default=384, help="tokenizer vocabulary size")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="HF config overrides (integers / floats as numbers), e.g. hidden_size=256")  # fmt: skip
    args = parser.parse_args()
    overrides = {}
    for item in args.config:
        key, _, value = item.partition("=")
        try:
            overrides[key] = int(value)
        except ValueError:
            try:
                overrides[key] = float(value)
            except ValueError:
                overrides[key] = value
    corpus = args.tokenizer_corpus.read_text() if args.tokenizer_corpus else None
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    for name in names if args.family == "all" else [args.family]:
        out = args.out / name if args.family == "all" else args.out
        make_tiny_model(name, out, seed=args.seed, dtype=dtype, tokenizer_corpus=corpus,
                        tokenizer_vocab_size=args.tokenizer_vocab, **overrides)  # fmt: skip
        print(f"{name}: {out}")


if __name__ == "__main__":
    main()
