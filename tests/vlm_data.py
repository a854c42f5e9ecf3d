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


def _parts(content: str) -> list[dict] | str:
    """`<image>` tags -> HF content parts, written out independently of data/multimodal.py."""
    if "<image>" not in content:
        return content
    parts = []
    for i, piece in enumerate(content.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def hf_predictions(model_dir: Path, rows: list[dict], base_dir: Path, max_new_tokens: int) -> list[str]:
    """The reference for `mswift-eval --qa` on image rows: each row alone (its last message the reference) through
    the model's processor (its chat template on content parts written out here, independently of data/multimodal.py)
    and HF generate (greedy), the reply decoded without special tokens."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_swift.models.tiny_processor import load_processor  # AutoProcessor needs torchvision

    processor = load_processor(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    predictions = []
    for row in rows:
        messages = [{"role": m["role"], "content": _parts(m["content"])} for m in row["messages"][:-1]]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [Image.open(base_dir / name).convert("RGB") for name in row.get("images", [])]
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        predictions.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])
    return predictions
