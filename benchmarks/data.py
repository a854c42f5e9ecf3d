"""Data pipeline throughput: JSONL -> template -> tokens + loss mask -> packed rows, in tokens per second.

Three sides on the same synthetic conversations (seeded, a system prompt and 1-3 rounds each), in one run:
- raw:     the fast tokenizer's `encode_batch` on the already rendered chat texts (no reading, no template,
           no labels, no packing): the ceiling a pipeline built on this tokenizer can approach;
- ours:    `build_train_data` with packing (reading, format detection, built-in chatml template, loss mask,
           truncation, best-fit packing), with 1 and 2 tokenization processes, and with the tokenizer's Jinja
           template (prefix rendering for the turn boundaries);
- ms-swift: its own `load_dataset` + `EncodePreprocessor` + `PackingDataset` (qwen template, binpack), run
           by the Python of a separate venv where ms-swift is installed (`--msswift-python`).
The tokenizer is the tiny byte-level BPE of the tests (ChatML), so texts give many tokens per character.

    python benchmarks/data.py [--rows 50000] [--rounds 2] [--msswift-python /work/venv-msswift/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_results  # benchmarks/ is on sys.path when a benchmark runs as a script

from megatron_swift.data import build_train_data
from megatron_swift.models.tiny import CORPUS, make_tiny_model
from megatron_swift.training.config import DataSection

SEQ = 4096  # longer than any conversation: nothing truncated on either side
TARGETS = {"ours_vs_raw": 0.5, "ours_vs_msswift": 3.0}

MSSWIFT_SIDE = """
import json, sys, time
from swift.dataset import EncodePreprocessor, PackingDataset, load_dataset
from swift.model import get_processor
from swift.template import get_template

model_dir, data, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
template = get_template(get_processor(model_dir, model_type="qwen2", download_model=False), max_length=seq,
                        truncation_strategy="right", template_type="qwen")
template.set_mode("train")
start = time.perf_counter()
train, _ = load_dataset([data], num_proc=1, load_from_cache_file=False)
encoded = EncodePreprocessor(template)(train, num_proc=1, load_from_cache_file=False)
packed = PackingDataset(template, encoded, num_proc=1, packing_length=seq)
seconds = time.perf_counter() - start
tokens = sum(sum(n) if isinstance(n, list) else n for n in encoded["lengths"])
print("RESULT " + json.dumps({"seconds": seconds, "tokens": int(tokens), "rows": len(encoded),
                              "packed_rows": len(packed)}))
"""


def synthetic_conversations(rows: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = CORPUS.split()

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words, int(rng.integers(low, high))))

    conversations = []
    for _ in range(rows):
        messages = [{"role": "system", "content": text(3, 15)}]
        for _ in range(int(rng.integers(1, 4))):
            messages += [{"role": "user", "content": text(5, 40)}, {"role": "assistant", "content": text(10, 120)}]
        conversations.append({"messages": messages})
    return conversations


def time_ours(path: Path, tokenizer, template: str, workers: int) -> dict:
    data = DataSection(dataset=[str(path)], seq_length=SEQ, packing=True, template=template, dataset_num_proc=workers)
    start = time.perf_counter()
    built = build_train_data(data, tokenizer, "sft", 8, 0)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.ids) for row in built.batches.items for s in row)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
            "packed_rows": built.num_samples, "padding_packed": built.stats["padding_fraction_packed"]}  # fmt: skip


def time_raw(texts: list[str], tokenizer) -> dict:
    start = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encodings)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds)}


def time_msswift(python: str, model_dir: Path, path: Path, cache: Path) -> dict:
    if not Path(python).exists():
        return {"error": f"{python} not found: pip install ms-swift in a separate venv and pass --msswift-python"}
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "MODELSCOPE_CACHE": str(cache), "PYTHONPATH": ""}
    run = subprocess.run([python, "-c", MSSWIFT_SIDE, str(model_dir), str(path), str(SEQ)], capture_output=True,
                         text=True, env=env, cwd=cache)  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        return {"error": (run.stderr or run.stdout).strip().splitlines()[-1:]}
    result = json.loads(lines[-1][len("RESULT ") :])
    return {
        **result,
        "seconds": round(result["seconds"], 3),
        "tokens_per_s": round(result["tokens"] / result["seconds"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--msswift-python", default="/work/venv-msswift/bin/python")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model("qwen2", tmp / "qwen2")  # ms-swift needs a model dir; both sides use its tokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        conversations = synthetic_conversations(args.rows)
        path = tmp / "conversations.jsonl"
        path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in conversations]
        # The machine is shared: raw and ours alternate for `--rounds` rounds and each keeps its fastest.
        rounds = [(time_raw(texts, tokenizer), time_ours(path, tokenizer, "chatml", 1)) for _ in range(args.rounds)]
        sides = {
            "raw_encode_batch": min((raw for raw, _ in rounds), key=lambda side: side["seconds"]),
            "ours_chatml_1proc": min((ours for _, ours in rounds), key=lambda side: side["seconds"]),
            "ours_chatml_2proc": time_ours(path, tokenizer, "chatml", 2),
            "ours_jinja_1proc": time_ours(path, tokenizer, "tokenizer", 1),
            "msswift_qwen_1proc": time_msswift(args.msswift_python, model_dir, path, tmp),
        }
    ours = max(sides["ours_chatml_1proc"]["tokens_per_s"], sides["ours_chatml_2proc"]["tokens_per_s"])
    ratios = {"ours_vs_raw": round(ours / sides["raw_encode_batch"]["tokens_per_s"], 3)}
    if "tokens_per_s" in sides["msswift_qwen_1proc"]:
        ratios["ours_vs_msswift"] = round(ours / sides["msswift_qwen_1proc"]["tokens_per_s"], 2)
    results = {"rows": args.rows, "seq_length": SEQ, "cpu_count": os.cpu_count(), "sides": sides, "ratios": ratios,
               "targets": TARGETS}  # fmt: skip
    lines = [f"# Data pipeline throughput ({args.rows} synthetic conversations, packing to {SEQ})", "",
             "| side | seconds | tokens | tokens/s |", "|---|---|---|---|"]  # fmt: skip
    for name, side in sides.items():
        if "error" in side:
            lines.append(f"| {name} | - | - | not run: {side['error']} |")
        else:
            lines.append(f"| {name} | {side['seconds']} | {side['tokens']} | {side['tokens_per_s']} |")
    lines += ["", "| ratio | measured | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | >= {TARGETS[name]} |" for name, value in ratios.items()]
    write_results(Path(args.out), "data", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
