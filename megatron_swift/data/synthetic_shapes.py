"""A small generated vision-language dataset: one coloured shape on a light background, questions with one-word
answers (its colour or its shape), as ms-swift jsonl + png files; deterministic by seed.

    python -m megatron_swift.data.synthetic_shapes OUT_DIR [--train 256] [--held-out 64] [--seed 0] [--corpus FILE]

writes OUT_DIR/train.jsonl, OUT_DIR/held_out.jsonl and OUT_DIR/images/*.png (paths in the rows are relative to
the jsonl files), and with --corpus the dataset's words (`tokenizer_corpus`) for a tiny model's tokenizer. Every
(colour, shape, question) combination appears equally often in each split (up to the remainder of the count), so a
model that learnt nothing scores 1/len(COLOURS) or 1/len(SHAPES).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape? Answer in one word.",
             "shape": "What shape is it? Answer in one word."}  # fmt: skip
BACKGROUND = (245, 245, 240)


def draw(colour: str, shape: str, size: int, rng: np.random.Generator):
    """A `size` x `size` image of one filled shape (random place and scale) in COLOURS[colour]."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    extent = int(rng.integers(size * 5 // 10, size * 8 // 10))
    left, top = (int(rng.integers(0, size - extent + 1)) for _ in range(2))
    box = (left, top, left + extent - 1, top + extent - 1)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(left + extent / 2, top), (left, top + extent - 1), (left + extent - 1, top + extent - 1)],
                    fill=COLOURS[colour])  # fmt: skip
    return image


def combinations() -> list[tuple[str, str, str]]:
    return [(colour, shape, asked) for colour in COLOURS for shape in SHAPES for asked in QUESTIONS]


def write_split(out_dir: Path, name: str, count: int, rng: np.random.Generator) -> Path:
    """`count` rows cycling through every combination (shuffled), each with its own png."""
    combos = combinations()
    picks = [combos[i % len(combos)] for i in range(count)]
    picks = [picks[i] for i in rng.permutation(count)]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index, (colour, shape, asked) in enumerate(picks):
            size = int(rng.integers(56, 113))
            image_name = f"images/{name}_{index:05d}.png"
            draw(colour, shape, size, rng).save(out_dir / image_name)
            row = {"messages": [{"role": "user", "content": "<image>" + QUESTIONS[asked]},
                                {"role": "assistant", "content": colour if asked == "colour" else shape}],
                   "images": [image_name]}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    return path


def write_dataset(out_dir: str | Path, train: int = 256, held_out: int = 64, seed: int = 0) -> dict[str, Path]:
    """Both splits under `out_dir` (the held-out images are drawn from another stream of the same seed)."""
    out_dir = Path(out_dir)
    streams = np.random.SeedSequence(seed).spawn(2)
    return {"train": write_split(out_dir, "train", train, np.random.default_rng(streams[0])),
            "held_out": write_split(out_dir, "held_out", held_out, np.random.default_rng(streams[1]))}  # fmt: skip


def tokenizer_corpus() -> str:
    """Every word of the dataset's chats as Qwen2.5-VL's chat template prints them (roles and the default system
    prompt included, each answer at a line start as it follows "assistant\\n"), one phrase a line: a tiny tokenizer
    trained on it (`make_tiny_model(..., tokenizer_corpus=...)`) keeps each answer one token and a sample short."""
    lines = ["system", "user", "assistant", "You are a helpful assistant.", *QUESTIONS.values(), *COLOURS, *SHAPES]
    return "\n".join(lines) + "\n"


def nearest_colour(pixels: np.ndarray) -> str:
    """The COLOURS name of the pixels that are not background (for checks: the answer read back from an image)."""
    flat = pixels.reshape(-1, 3).astype(np.int64)
    shape_pixels = flat[np.abs(flat - np.asarray(BACKGROUND)).sum(-1) > 60]
    mean = shape_pixels.mean(0)
    return min(COLOURS, key=lambda name: math.dist(mean, COLOURS[name]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, help="also write the tokenizer corpus (tokenizer_corpus) here")
    args = parser.parse_args(argv)
    paths = write_dataset(args.out_dir, args.train, args.held_out, args.seed)
    if args.corpus:
        args.corpus.write_text(tokenizer_corpus())
    print(" ".join(f"{name}={path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
