"""A small image-SFT dataset for vision-language training tests: shapes drawn in colours on canvases of four
sizes (so a micro-batch holds images of different sizes), one row with two images (the third) and two text-only
rows (the second and the sixth), as ms-swift rows (`messages` with `<image>` tags, `images` relative to the
file)."""

from __future__ import annotations

import json
from pathlib import Path

SIZES = ((40, 24), (24, 40), (32, 32), (48, 32))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def write_image_rows(folder: Path, rows: int = 8) -> Path:
    """`rows` rows as folder/train.jsonl; returns its path."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for index in range(rows):
        if index in (1, 5):
            lines.append({"messages": [{"role": "user", "content": f"Say the number {index}."},
                                       {"role": "assistant", "content": f"The number is {index}."}]})  # fmt: skip
            continue
        images = []
        for k in range(2 if index == 2 else 1):
            width, height = SIZES[(index + k) % len(SIZES)]
            colour = names[(index + k) % len(names)]
            image = Image.new("RGB", (width, height), (250, 250, 250))
            ImageDraw.Draw(image).ellipse((4, 4, width - 4, height - 4), fill=COLOURS[colour])
            image.save(folder / f"image{index}_{k}.png")
            images.append((f"image{index}_{k}.png", colour))
        question = "".join("<image>" for _ in images) + "What colour is the shape?"
        answer = " and ".join(colour for _, colour in images)
        lines.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                      "images": [name for name, _ in images]})  # fmt: skip
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
