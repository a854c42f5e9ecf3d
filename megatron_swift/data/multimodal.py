"""Multimodal rows -> token ids, loss weights and media, encoded by the model's HF processor; their collates.

Rows are ms-swift's: a chat row (any format of formats.py) whose text holds one `<image>` tag per entry of
`images` (and `<video>` per entry of `videos`), in order:

    {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                  {"role": "assistant", "content": "red"}], "images": ["a.png"]}

An image is a path (relative paths resolve against the data file's directory), `{"path": ...}` or
`{"bytes": ...}` (how HF datasets store images), raw bytes, a base64 string or a `data:` URL.

Encoding: the tags become the processor's content parts (`{"type": "image"}` between text parts), the
conversation is rendered by the processor's chat template (HF's content-parts form), and the text and images
go through the processor itself, so the ids (each image's pad token repeated t*h*w / merge^2 times),
`pixel_values` and `image_grid_thw` are HF's. Loss weights are the text path's (assistant turns, loss_scale,
role scales; chat_template.py finds the turns), and the media pad tokens are never trained.

Samples keep where their images are, not their pixels (an image's patches weigh megabytes): the collates load
and process each micro-batch's images again, with the same processor and settings. Videos (lists of frame
images) need a video processor (torchvision); without one a row with videos is refused. The video path is
written but untested: this project's environment has no torchvision.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_swift.data.chat_template import TokenizerTemplate, _printed_forms
from megatron_swift.data.encode import token_weights
from megatron_swift.data.errors import DataError, RowProblem
from megatron_swift.data.formats import Conversation, normalise
from megatron_swift.data.labels import LossPolicy, TruncationCounts
from megatron_swift.data.packing import PackedCollate, PaddedCollate
from megatron_swift.data.sources import Row

TAGS = {"image": "<image>", "video": "<video>"}
TAG_PATTERN = re.compile("(<image>|<video>)")


@dataclass(frozen=True)
class MediaSample:
    """One conversation: ids and weights as `Sample`, and its media (sources, each image's grid), in text order."""

    ids: np.ndarray
    weights: np.ndarray
    where: str  # the row's file:line
    images: tuple = ()  # ("path", absolute path) or ("bytes", data) per image
    image_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    videos: tuple = ()  # per video: a tuple of frame sources
    video_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def image_options(processor, max_pixels: int | None = None, min_pixels: int | None = None) -> dict:
    """The image processor's call options for data.max_pixels / data.min_pixels (ms-swift's names; unset: the
    processor's own). Given as `size` (shortest_edge = min pixels, longest_edge = max pixels): transformers
    deprecates the min_pixels / max_pixels call arguments."""
    if max_pixels is None and min_pixels is None:
        return {}
    size = processor.image_processor.size
    return {"size": {"shortest_edge": min_pixels if min_pixels is not None else size["shortest_edge"],
                     "longest_edge": max_pixels if max_pixels is not None else size["longest_edge"]}}  # fmt: skip


def _content_parts(text: str) -> list[dict] | str:
    """`<image>` / `<video>` tags -> HF content parts; a text without tags stays a string."""
    pieces = [piece for piece in TAG_PATTERN.split(text) if piece]
    if not any(piece in TAGS.values() for piece in pieces):
        return text
    kinds = {tag: kind for kind, tag in TAGS.items()}
    return [{"type": kinds[piece]} if piece in kinds else {"type": "text", "text": piece} for piece in pieces]


def content_parts_messages(messages: list[dict]) -> list[dict]:
    """The conversation in HF's content-parts form: every string content a list of text / image / video parts."""
    out = []
    for message in messages:
        content = _content_parts(message["content"]) if message.get("content") else []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({**message, "content": content})
    return out


class ProcessorTemplate(TokenizerTemplate):
    """The processor's chat template on content parts; turns found as chat_template.py does for tokenizers.

    The values are the messages' strings with their tags; the template prints a tag as its own markup
    (`<|vision_start|><|image_pad|><|vision_end|>` for Qwen2.5-VL), found once by rendering one part.
    """

    name = "processor"

    def __init__(self, processor):
        if not getattr(processor, "chat_template", None):
            raise DataError("the model's processor has no chat_template")
        self.processor = processor
        super().__init__(_HasTemplate())
        probe = "Q" + self.nonce + "P"
        self.markup = {}
        for tag in TAGS.values():
            text = self._render([{"role": "user", "content": f"{probe}1{tag}{probe}2"}], None)
            self.markup[tag] = text[text.index(probe + "1") + len(probe) + 1 : text.index(probe + "2")]

    def _printed_forms(self, value: str) -> list[str]:
        forms = _printed_forms(value)
        if TAG_PATTERN.search(value):
            printed = TAG_PATTERN.sub(lambda match: self.markup[match.group(0)], value)
            forms = list(dict.fromkeys([*_printed_forms(printed), *forms]))
        return forms

    def _render(self, messages: list[dict], tools, generation_prompt: bool = False) -> str:
        try:
            return self.processor.apply_chat_template(content_parts_messages(messages), tools=tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)  # fmt: skip
        except Exception as error:
            raise RowProblem(f"the processor's chat_template refuses {len(messages)} message(s): {error}") from None


class _HasTemplate:
    chat_template = "processor"  # TokenizerTemplate's check; rendering is ProcessorTemplate._render


def _media_list(data: dict, key: str) -> list:
    value = data.get(key)
    if value is None or value == []:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_image(source, base_dir: Path, what: str) -> tuple[str, object]:
    """An image entry -> ("path", absolute path) or ("bytes", data); RowProblem when missing or not an image."""
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path") is not None:
            source = source["path"]
        else:
            raise RowProblem(f"{what} is a dict without 'path' or 'bytes'")
    if isinstance(source, (bytes, bytearray)):
        return "bytes", bytes(source)
    if not isinstance(source, str) or not source:
        kind = type(source).__name__
        raise RowProblem(f"{what} must be a path, {{'path': ...}}, {{'bytes': ...}} or base64, got {kind}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise RowProblem(f"{what} is a data URL that is not base64")
        return "bytes", _b64(payload, what)
    if source.startswith(("http://", "https://")):
        raise RowProblem(f"{what} is a URL ({source[:80]}); images are not downloaded: give a local path")
    if len(source) > 256 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", source):  # a bare base64 image, not a path
        return "bytes", _b64(source, what)
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return "path", str(path)
    raise RowProblem(f"{what}: no such file {source}" + (f" (looked for {path})" if str(path) != source else ""))


def _b64(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise RowProblem(f"{what} is not valid base64") from None


def open_image(ref: tuple[str, object], what: str):
    """The PIL image (fully decoded, so a truncated or corrupt file fails here, not in the collate)."""
    from PIL import Image, UnidentifiedImageError

    kind, value = ref
    try:
        data = Path(value).read_bytes() if kind == "path" else value
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        shown = value if kind == "path" else f"{len(value)} bytes"
        raise RowProblem(f"{what} ({shown}) is not a readable image: {error}") from None
    return image


def _base_dir(where: str) -> Path:
    return Path(where.rsplit(":", 1)[0]).parent


def check_media_tags(messages: list[dict], data: dict) -> None:
    """RowProblem unless the messages hold one tag per entry of the row's `images` / `videos`, none of them in an
    assistant turn."""
    for kind in TAGS:
        entries = _media_list(data, f"{kind}s")
        tags = sum(m["content"].count(TAGS[kind]) for m in messages if m.get("content"))
        if tags != len(entries):
            raise RowProblem(f"{tags} {TAGS[kind]} tag(s) in the messages but {len(entries)} {kind}s; each "
                             f"{kind} needs one {TAGS[kind]} tag where it goes")  # fmt: skip
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and TAG_PATTERN.search(message.get("content") or ""):
            raise RowProblem(f"messages[{i}] (assistant) holds a media tag; media go in user or system turns")


def row_images(data: dict, where: str) -> list[tuple[str, object]]:
    """The row's `images` resolved (relative paths against the directory of the data file `where` names)."""
    base = _base_dir(where)
    return [resolve_image(source, base, f"images[{i}]") for i, source in enumerate(_media_list(data, "images"))]


class MediaEncoder:
    """Picklable, like `Encoder`: rows -> MediaSample (or what is wrong with the row), with the model's processor."""

    task = "sft"

    def __init__(self, processor, policy: LossPolicy, row_format: str = "auto", options: dict | None = None):
        if getattr(processor, "image_processor", None) is None:
            raise DataError("the model's processor has no image processor")
        self.processor, self.policy, self.row_format = processor, policy, row_format
        self.options = dict(options or {})  # image processor options (max_pixels, min_pixels)
        self.template = ProcessorTemplate(processor)
        self.tokenizer = processor.tokenizer
        self.media_ids = {self.tokenizer.convert_tokens_to_ids(processor.image_token),
                          self.tokenizer.convert_tokens_to_ids(processor.video_token)}  # fmt: skip

    def check(self, row: Row) -> tuple[Conversation, list, list]:
        """(conversation, image refs, video frame refs), or RowProblem: tags against entries, files readable."""
        item = normalise(row.data, self.row_format)
        if isinstance(item, str):
            raise RowProblem("SFT rows need a conversation; 'text' rows are for train.task=pretrain")
        videos = _media_list(row.data, "videos")
        check_media_tags(item.messages, row.data)
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise RowProblem("the row has videos but the processor has no video processor (transformers' video "
                             "processors need torchvision)")  # fmt: skip
        base = _base_dir(row.where)
        image_refs = row_images(row.data, row.where)
        video_refs = []
        for i, video in enumerate(videos):
            if not isinstance(video, (list, tuple)) or not video:
                raise RowProblem(f"videos[{i}] must be a list of frame images (video files are not decoded here)")
            video_refs.append(tuple(resolve_image(f, base, f"videos[{i}][{j}]") for j, f in enumerate(video)))
        return item, image_refs, video_refs

    def encode(self, rows: Sequence[Row]) -> list[MediaSample | str]:
        results = []
        for row in rows:
            try:
                results.append(self.encode_row(row))
            except RowProblem as problem:
                results.append(str(problem))
        return results

    def encode_row(self, row: Row) -> MediaSample:
        conversation, image_refs, video_refs = self.check(row)
        images = [open_image(ref, f"images[{i}]") for i, ref in enumerate(image_refs)]
        videos = [[open_image(ref, f"videos[{i}][{j}]") for j, ref in enumerate(v)] for i, v in enumerate(video_refs)]
        segments = self.template.segments(conversation)
        weights = self.policy.segment_weights(segments)
        if not any(weights):
            raise RowProblem("no token to train on (every turn is masked by the loss policy)")
        text = "".join(s.text for s in segments)
        out = self.processor(text=[text], images=images or None, videos=videos or None, return_tensors="np",
                             **self.options)  # fmt: skip
        ids = np.asarray(out["input_ids"][0], dtype=np.int32)
        image_grid = np.asarray(out.get("image_grid_thw", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
        video_grid = np.asarray(out.get("video_grid_thw", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
        # The processor expanded each pad token in place: expand the segments alike, then each token takes its
        # segment's weight (encode.token_weights) on the same ids.
        counts = iter([int(np.prod(g)) // self.processor.image_processor.merge_size**2 for g in image_grid])
        video_counts = iter([int(np.prod(g)) // self._video_merge() ** 2 for g in video_grid])
        image_token, video_token = self.processor.image_token, self.processor.video_token
        expanded = []
        for segment in segments:
            piece = re.sub(re.escape(image_token), lambda _: image_token * next(counts), segment.text)
            piece = re.sub(re.escape(video_token), lambda _: video_token * next(video_counts), piece)
            expanded.append(type(segment)(piece, segment.role, segment.turn))
        encoding = self.tokenizer.backend_tokenizer.encode("".join(s.text for s in expanded), add_special_tokens=False)
        if encoding.ids != ids.tolist():
            raise RowProblem("the processor's token ids differ from the tokenizer's on the same text")
        token_weight = token_weights(encoding, expanded, weights)
        token_weight[np.isin(ids, list(self.media_ids))] = 0.0  # a media token is an input, never a target
        if not token_weight[1:].any():
            raise RowProblem("no token to train on")
        return MediaSample(ids, token_weight, row.where, tuple(image_refs), image_grid, tuple(video_refs), video_grid)

    def _video_merge(self) -> int:
        return self.processor.video_processor.merge_size


def fit_media_sample(sample: MediaSample, max_length: int, strategy: str, counts: TruncationCounts,
                     media_ids: set[int], cut: list[str]) -> MediaSample | None:  # fmt: skip
    """The sample cut to max_length (labels.truncate's strategies) unless the cut would drop a media token: then
    the sample is deleted and named in `cut` (an image's tokens are all or nothing)."""
    if len(sample.ids) <= max_length:
        return sample
    if strategy == "delete":
        counts.deleted += 1
        return None
    keep = slice(len(sample.ids) - max_length, None) if strategy == "left" else slice(0, max_length)
    dropped = np.ones(len(sample.ids), dtype=bool)
    dropped[keep] = False
    if np.isin(sample.ids[dropped], list(media_ids)).any():
        counts.deleted += 1
        cut.append(f"{sample.where}: {len(sample.ids)} tokens; truncating to {max_length} would cut an image's tokens")
        return None
    counts.truncated += 1
    ids, weights = sample.ids[keep], sample.weights[keep]
    if not weights[1:].any():
        counts.no_target += 1
        return None
    return MediaSample(ids, weights, sample.where, sample.images, sample.image_grid_thw, sample.videos,
                       sample.video_grid_thw)  # fmt: skip


PositionsFn = Callable[..., torch.Tensor]  # (input_ids, image_grid_thw, video_grid_thw, attention_mask) -> [3, b, s]


@dataclass(frozen=True)
class MediaBatchMixin:
    """The media of a micro-batch: every image of every sample, in order, processed again (module docstring)."""

    processor: object
    options: dict

    def media(self, samples: Sequence[MediaSample]) -> dict[str, torch.Tensor]:
        out = {}
        images = [open_image(ref, f"{s.where}: images[{i}]") for s in samples for i, ref in enumerate(s.images)]
        if images:
            processed = self.processor.image_processor(images=images, return_tensors="pt", **self.options)
            grid = np.concatenate([s.image_grid_thw for s in samples])
            if not np.array_equal(processed["image_grid_thw"].numpy(), grid):
                raise DataError(f"an image of {', '.join(s.where for s in samples)} changed since it was tokenized")
            out |= {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
        videos = [[open_image(ref, s.where) for ref in video] for s in samples for video in s.videos]
        if videos:
            processed = self.processor.video_processor(videos=videos, return_tensors="pt")
            out |= {"pixel_values_videos": processed["pixel_values_videos"],
                    "video_grid_thw": processed["video_grid_thw"]}  # fmt: skip
        return out


def _grids(samples: Sequence[MediaSample], name: str) -> torch.Tensor | None:
    grid = np.concatenate([getattr(s, name) for s in samples])
    return torch.from_numpy(grid) if len(grid) else None


@dataclass(frozen=True)
class MediaPaddedCollate(MediaBatchMixin):
    """PaddedCollate's tokens / labels / loss_mask, plus the media; `positions_fn` gives position_ids [3, b, s]."""

    seq_length: int = 0
    pad_id: int = 0
    positions_fn: PositionsFn | None = None

    def __call__(self, samples: list[MediaSample]) -> dict[str, torch.Tensor]:
        batch = PaddedCollate(self.seq_length, self.pad_id)(samples) | self.media(samples)
        if self.positions_fn is not None:
            mask = torch.zeros(len(samples), self.seq_length, dtype=torch.long)
            for r, sample in enumerate(samples):
                mask[r, : min(len(sample.ids), self.seq_length)] = 1
            batch["position_ids"] = self.positions_fn(batch["tokens"], _grids(samples, "image_grid_thw"),
                                                      _grids(samples, "video_grid_thw"), mask)  # fmt: skip
        return batch


@dataclass(frozen=True)
class MediaPackedCollate(MediaBatchMixin):
    """PackedCollate's rows of documents (cu_seqlens), plus the media in document order; with `positions_fn`,
    position_ids [3, b, s] computed per document (the padding after a row's documents counts on from 0)."""

    seq_length: int = 0
    pad_id: int = 0
    positions_fn: PositionsFn | None = None

    def __call__(self, rows: list[list[MediaSample]]) -> dict[str, torch.Tensor]:
        batch = PackedCollate(self.seq_length, self.pad_id)(rows)
        documents = [sample for row in rows for sample in row]
        batch |= self.media(documents)
        if self.positions_fn is not None:
            positions = batch["position_ids"].unsqueeze(0).repeat(3, 1, 1)
            for r, row in enumerate(rows):
                at = 0
                for sample in row:
                    n = len(sample.ids) - 1
                    tokens = torch.from_numpy(sample.ids[:-1]).long().unsqueeze(0)
                    positions[:, r, at : at + n] = self.positions_fn(
                        tokens, _grids([sample], "image_grid_thw"), _grids([sample], "video_grid_thw"),
                        torch.ones_like(tokens))[:, 0]  # fmt: skip
                    at += n
            batch["position_ids"] = positions
        return batch
