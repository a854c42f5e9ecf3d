"""The multimodal data path (data/multimodal.py) against HF's own Qwen2.5-VL processor called directly.

References are independent of the product code: the processor's `apply_chat_template` on the content-parts form
written out here, `processor(text=..., images=...)` on images opened here with PIL, the tokenizer's own tokens of
each assistant reply, and a processor built with max_pixels in its constructor (not our call options).
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_swift.data.errors import DataError
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.multimodal import MediaEncoder, MediaPackedCollate, MediaPaddedCollate, image_options
from megatron_swift.data.pipeline import build_train_data
from megatron_swift.data.sources import Row
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.models.tiny_processor import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    VISION_TOKENS,
    load_processor,
    make_tiny_vlm_processor,
)
from megatron_swift.training.config import DataSection

IMAGE_PAD = 386  # the tiny tokenizer's <|image_pad|> (make_tiny_vlm_processor adds the vision tokens after its 384)


@pytest.fixture(scope="module")
def processor():
    return make_tiny_vlm_processor(make_tiny_tokenizer())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real-size photos-like images (noise over gradients) and small ones, as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (width, height) in {"vga.png": (640, 480), "hd.png": (1280, 720), "small.png": (84, 56)}.items():
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def conversation(first: str = "vga.png", second: str = "hd.png") -> dict:
    return {"messages": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "<image>What colour is the shape?"},
                         {"role": "assistant", "content": "red"},
                         {"role": "user", "content": "And here: <image> which shape?"},
                         {"role": "assistant", "content": "circle"}],
            "images": [first, second]}  # fmt: skip


def parts_form(row: dict) -> list[dict]:
    """The same conversation written by hand in HF's content-parts form (the reference for rendering)."""
    m = row["messages"]
    return [{"role": "system", "content": [{"type": "text", "text": m[0]["content"]}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "And here: "}, {"type": "image"},
                                         {"type": "text", "text": " which shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]  # fmt: skip


def encode(processor, row: dict, folder, policy=None, options=None):
    sample = MediaEncoder(processor, policy or LossPolicy(), options=options).encode([Row(f"{folder}/d.jsonl:1", row)])
    assert not isinstance(sample[0], str), sample[0]
    return sample[0]


def test_tiny_processor_has_qwen_settings_and_round_trips(processor, images, tmp_path):
    tokenizer = processor.tokenizer
    assert all(token in tokenizer.get_vocab() for token in VISION_TOKENS)
    again = make_tiny_vlm_processor(tokenizer)  # a tokenizer that already has the tokens keeps its vocabulary
    assert len(again.tokenizer) == len(tokenizer)
    settings = processor.image_processor
    assert (settings.patch_size, settings.merge_size, settings.temporal_patch_size) == (14, 2, 2)
    assert (settings.size["shortest_edge"], settings.size["longest_edge"]) == (3136, 12845056)
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert loaded.chat_template == QWEN2_5_VL_CHAT_TEMPLATE and loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    text = processor.apply_chat_template(parts_form(conversation()), tokenize=False)
    pictures = [Image.open(images / "vga.png"), Image.open(images / "hd.png")]
    want, got = processor(text=[text], images=pictures), loaded(text=[text], images=pictures)
    assert np.array_equal(want["input_ids"], got["input_ids"])
    assert np.array_equal(want["pixel_values"], got["pixel_values"])
    make_tiny_tokenizer().save_pretrained(tmp_path / "text")
    assert load_processor(tmp_path / "text") is None  # a text-only model directory: no processor


@pytest.mark.parametrize("max_pixels", [None, 100_000])
def test_ids_pixels_and_grids_are_what_the_hf_processor_gives(processor, images, max_pixels):
    row = conversation()
    options = image_options(processor, max_pixels=max_pixels)
    sample = encode(processor, row, images, options=options)
    reference = make_tiny_vlm_processor(processor.tokenizer, **({"max_pixels": max_pixels} if max_pixels else {}))
    text = reference.apply_chat_template(parts_form(row), tokenize=False)
    pictures = [Image.open(images / "vga.png"), Image.open(images / "hd.png")]
    want = reference(text=[text], images=pictures, return_tensors="pt")
    assert sample.ids.tolist() == want["input_ids"][0].tolist()
    assert np.array_equal(sample.image_grid_thw, want["image_grid_thw"].numpy())
    batch = MediaPaddedCollate(processor, options, seq_length=len(sample.ids) + 8, pad_id=0)([sample])
    assert torch.equal(batch["pixel_values"], want["pixel_values"])  # max abs difference 0
    assert torch.equal(batch["image_grid_thw"], want["image_grid_thw"])
    if max_pixels:
        assert (want["image_grid_thw"].prod(-1) * 14 * 14 <= max_pixels).all()
    else:
        assert want["image_grid_thw"].tolist() == [[1, 34, 46], [1, 52, 92]]  # 476x644 and 728x1288: 14 x 2 steps


BARE = {"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "two"}],
        "images": ["small.png", "vga.png"]}  # fmt: skip
BARE_PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]  # fmt: skip


@pytest.mark.parametrize("row, parts", [(conversation(), parts_form(conversation())), (BARE, BARE_PARTS)])
def test_rendered_text_is_the_processor_template_on_content_parts(processor, images, row, parts):
    encoder = MediaEncoder(processor, LossPolicy())
    conv, _, _ = encoder.check(Row(f"{images}/d.jsonl:1", row))
    rendered = "".join(s.text for s in encoder.template.segments(conv))
    assert rendered == processor.apply_chat_template(parts, tokenize=False)
    assert rendered.count("<|vision_start|><|image_pad|><|vision_end|>") == 2


@pytest.mark.parametrize("scope", ["default", "last_round", "all"])
def test_labels_are_the_assistant_replies_and_never_an_image_token(processor, images, scope):
    sample = encode(processor, conversation(), images, policy=LossPolicy(scope))
    tokens = processor.tokenizer.convert_ids_to_tokens(sample.ids.tolist())
    media = np.isin(sample.ids, [processor.image_token_id, processor.video_token_id])
    assert media.sum() == int(sample.image_grid_thw.prod(-1).sum()) // 4 and not sample.weights[media].any()
    if scope == "all":
        assert (sample.weights[~media][1:] == 1).all()
        return
    # Reference: each reply's own tokens, then the end of turn the template prints (<|im_end|> and its newline).
    tokenizer = processor.tokenizer
    replies = ["red", "circle"] if scope == "default" else ["circle"]
    want = [tokenizer.convert_ids_to_tokens(tokenizer(reply + "<|im_end|>\n")["input_ids"]) for reply in replies]
    want = [token for reply in want for token in reply]
    assert [t for t, w in zip(tokens, sample.weights, strict=True) if w] == want


def test_image_sources_path_dict_bytes_base64_and_data_url_agree(processor, images):
    data = (images / "small.png").read_bytes()
    encoded = base64.b64encode(data).decode()
    sources = ["small.png", str(images / "small.png"), {"path": "small.png"}, {"bytes": data, "path": None}, data,
               encoded, "data:image/png;base64," + encoded]  # fmt: skip
    samples = [encode(processor, conversation(source, "small.png"), images) for source in sources]
    for sample in samples[1:]:
        assert np.array_equal(sample.ids, samples[0].ids)
    collate = MediaPaddedCollate(processor, {}, seq_length=max(len(s.ids) for s in samples), pad_id=0)
    pixels = [collate([s])["pixel_values"] for s in samples]
    assert all(torch.equal(p, pixels[0]) for p in pixels[1:])


def _write(folder, rows, name="d.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _data(path, **options) -> DataSection:
    return DataSection(dataset=[str(path)], **{"seq_length": 1024, "shuffle": False, **options})


BAD_ROWS = {
    "missing": ({**conversation("vga.png", "nope.png")}, "no such file nope.png"),
    "corrupt": ({**conversation("vga.png", "corrupt.png")}, "is not a readable image"),
    "tags": ({**conversation(), "images": ["vga.png"]}, "2 <image> tag(s) in the messages but 1 images"),
    "video_tags": ({**conversation(), "videos": [["small.png"]]}, "0 <video> tag(s) in the messages but 1 videos"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_media_rows_name_file_and_line(processor, images, case):
    (images / "corrupt.png").write_bytes((images / "small.png").read_bytes()[:60])  # a truncated PNG
    row, message = BAD_ROWS[case]
    path = _write(images, [conversation(), row], f"{case}.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        build_train_data(_data(path), processor.tokenizer, "sft", 1, 0, processor=processor)


def test_bad_media_rows_are_skipped_and_counted_and_text_models_refuse_images(processor, images):
    (images / "corrupt.png").write_bytes((images / "small.png").read_bytes()[:60])
    rows = [conversation(), *[row for row, _ in BAD_ROWS.values()], conversation("small.png", "small.png")]
    path = _write(images, rows, "mixed.jsonl")  # relative image paths resolve against the file's folder
    data = build_train_data(_data(path, skip_bad_rows=True), processor.tokenizer, "sft", 2, 0, processor=processor)
    assert (data.stats["bad_rows"], data.stats["samples"], data.stats["images"]) == (4, 2, 4)
    # The same file for a text-only model: the first row with images is refused, naming it.
    with pytest.raises(DataError, match=f"{path}:1: the row has images .* text-only"):
        build_train_data(_data(path), make_tiny_tokenizer(), "sft", 1, 0)


def test_truncation_never_cuts_an_image(processor, images):
    row = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red " * 40}],
           "images": ["small.png"]}  # fmt: skip
    late = {"messages": [{"role": "user", "content": "word " * 40 + "<image>"}, {"role": "assistant", "content": "ok"}],
            "images": ["small.png"]}  # fmt: skip
    path = _write(images, [row, late], "long.jsonl")
    full = encode(processor, row, images)
    data = build_train_data(_data(path, seq_length=len(full.ids) - 20), processor.tokenizer, "sft", 1, 0,
                            processor=processor)  # fmt: skip
    assert (data.stats["truncated"], data.stats["deleted_image_cut"]) == (1, 1)
    assert f"{path}:2" in data.stats["image_cut_examples"][0]
    kept = data.batches.items[0]
    assert np.array_equal(kept.ids, full.ids[: len(full.ids) - 19]) and np.array_equal(
        kept.image_grid_thw, full.image_grid_thw
    )


def _positions(tokens, image_grid, video_grid, mask):
    """A stand-in for the 3-D rope positions: checks it is given the grids of exactly the images in `tokens`, and
    returns the text positions and a count of the image tokens so far (per row: the same packed or padded)."""
    images = tokens == IMAGE_PAD
    assert int(images.sum()) == (0 if image_grid is None else int(image_grid.prod(-1).sum()) // 4)
    base = torch.cumsum(mask, -1) - 1
    return torch.stack([base, base + torch.cumsum(images.long(), -1), mask])


def test_collates_align_pixels_with_image_tokens_and_packed_equals_padded(processor, images):
    assert processor.image_token_id == IMAGE_PAD
    text_only = {"messages": [{"role": "user", "content": "No image here."}, {"role": "assistant", "content": "ok"}]}
    rows = [conversation(), conversation("small.png", "vga.png"), text_only]
    samples = [encode(processor, row, images) for row in rows]
    seq = sum(len(s.ids) for s in samples)
    padded = MediaPaddedCollate(processor, {}, seq, 0, _positions)(samples)
    packed = MediaPackedCollate(processor, {}, seq, 0, _positions)([samples])
    grids = padded["image_grid_thw"]
    assert padded["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    at = 0
    for r, sample in enumerate(samples):  # each row's image tokens = its images' merged patches, in order
        n = len(sample.images)
        tokens = (padded["tokens"][r] == processor.image_token_id).sum()
        assert tokens == int(grids[at : at + n].prod(-1).sum()) // 4
        at += n
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(packed[key], padded[key])
    start = 0
    for r, sample in enumerate(samples):
        n = len(sample.ids) - 1
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(packed[key][0, start : start + n], padded[key][r, :n])
        assert torch.equal(packed["position_ids"][:, 0, start : start + n], padded["position_ids"][:, r, :n])
        start += n
    assert padded["position_ids"].shape == (3, 3, seq) and packed["position_ids"].shape == (3, 1, seq)


def test_synthetic_shapes_are_balanced_deterministic_and_answered_right(processor, tmp_path):
    from collections import Counter

    from megatron_swift.data.synthetic_shapes import COLOURS, QUESTIONS, SHAPES, write_dataset

    paths = write_dataset(tmp_path / "a", train=48, held_out=24, seed=3)
    again = write_dataset(tmp_path / "b", train=48, held_out=24, seed=3)
    assert paths["train"].read_text() == again["train"].read_text()
    seen = Counter()
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            image_file = path.parent / row["images"][0]
            assert image_file.read_bytes() == (again[split].parent / row["images"][0]).read_bytes()
            pixels = np.asarray(Image.open(image_file).convert("RGB")).reshape(-1, 3)
            assert 56 <= Image.open(image_file).size[0] <= 112
            # Read the answer back from the pixels: the shape's colour is the most common non-background value;
            # the shape is told by how much of its bounding box it fills (square 1, circle pi/4, triangle 1/2).
            values, counts = np.unique(pixels, axis=0, return_counts=True)
            colour = next(tuple(v) for v in values[np.argsort(-counts)].tolist() if tuple(v) != (245, 245, 240))
            mask = (np.asarray(Image.open(image_file).convert("RGB")) == colour).all(-1)
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            asked = "colour" if row["messages"][0]["content"].endswith(QUESTIONS["colour"]) else "shape"
            name = next(n for n, rgb in COLOURS.items() if rgb == colour)
            assert row["messages"][1]["content"] == (name if asked == "colour" else shape), (image_file, fill)
            seen[(split, name, shape, asked)] += 1
    assert set(seen.values()) == {2 if split == "train" else 1 for split in paths}  # every combination equally often
    assert len(seen) == 2 * len(COLOURS) * len(SHAPES) * len(QUESTIONS)
    data = build_train_data(_data(paths["train"], seq_length=256), processor.tokenizer, "sft", 4, 0,
                            processor=processor)  # fmt: skip
    assert data.stats["samples"] == 48 and data.stats["images"] == 48


@pytest.mark.parametrize("packing", [False, True])
def test_build_train_data_gives_media_microbatches(processor, images, packing):
    rows = [conversation(), conversation("small.png", "small.png"), conversation("hd.png", "small.png")]
    path = _write(images, rows, "three.jsonl")
    data = build_train_data(_data(path, seq_length=4096, packing=packing, max_pixels=60_000), processor.tokenizer,
                            "sft", 1 if packing else 3, 0, processor=processor)  # fmt: skip
    assert data.num_samples == (1 if packing else 3)  # packed: the three conversations fit one row
    (batch,) = data.batches.next_microbatches(0, 1, 1 if packing else 3)
    grid = batch["image_grid_thw"]
    assert len(grid) == 6 and (grid.prod(-1) * 14 * 14 <= 60_000).all()  # data.max_pixels reaches the processor
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert int((batch["tokens"] == IMAGE_PAD).sum()) == int(grid.prod(-1).sum()) // 4
    assert ("cu_seqlens" in batch) == packing


def test_weights_are_the_text_paths_and_the_encoder_pickles(processor, images):
    """Without images a row is weighted exactly as the text path weights it with the same template (the
    tokenizer's own, chat_template.py); with images, the trained tokens are the same; a pickled encoder (what
    dataset_num_proc workers get) encodes the same."""
    import pickle

    from megatron_swift.data.encode import Encoder
    from megatron_swift.data.templates import make_template

    tokenizer = make_tiny_tokenizer()
    make_tiny_vlm_processor(tokenizer)  # the same vocabulary as the processor's tokenizer
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    text_path = Encoder(tokenizer, make_template("auto", tokenizer), LossPolicy())
    row = conversation()
    untagged = {"messages": [{**m, "content": m["content"].replace("<image>", "")} for m in row["messages"]]}
    (want,) = text_path.encode([Row("t.jsonl:1", untagged)])
    got = encode(processor, untagged, images)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.weights, want.weights)
    with_images = encode(processor, row, images)
    assert np.array_equal(with_images.ids[with_images.weights > 0], want.ids[want.weights > 0])
    encoder = MediaEncoder(processor, LossPolicy())
    (again,) = pickle.loads(pickle.dumps(encoder)).encode([Row(f"{images}/d.jsonl:1", row)])
    assert np.array_equal(again.ids, with_images.ids) and np.array_equal(again.weights, with_images.weights)


def test_load_processor_reads_a_hub_style_checkpoint_directory(processor, images, tmp_path):
    """The layout Qwen2.5-VL checkpoints ship (preprocessor_config.json, chat_template.json, a video processor
    config) loads, and processes images as the tiny processor does."""
    from megatron_swift.models.tiny_processor import QWEN2_5_VL_IMAGE_SETTINGS

    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**QWEN2_5_VL_IMAGE_SETTINGS,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))  # fmt: skip
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type":
        "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))  # fmt: skip
    loaded = load_processor(tmp_path)
    text = processor.apply_chat_template(parts_form(conversation()), tokenize=False)
    pictures = [Image.open(images / "vga.png"), Image.open(images / "hd.png")]
    want, got = processor(text=[text], images=pictures), loaded(text=[text], images=pictures)
    assert np.array_equal(want["input_ids"], got["input_ids"])
    assert np.array_equal(want["pixel_values"], got["pixel_values"])


@pytest.mark.parametrize("option, message", [({"streaming": True}, "data.streaming is not supported"),
                                             ({"cache_dir": "c"}, "data.cache_dir is not supported"),
                                             ({"template": "chatml"}, "use template auto")])  # fmt: skip
def test_unsupported_options_are_refused_by_name(processor, images, option, message):
    path = _write(images, [conversation()], "one.jsonl")
    with pytest.raises(DataError, match=message):
        build_train_data(_data(path, **option), processor.tokenizer, "sft", 1, 0, processor=processor)
