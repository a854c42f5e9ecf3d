"""3-D rotary positions (temporal, height, width) of Qwen2.5-VL style multimodal rows: pure tensor code.

A row is text tokens (one position each, the same on all three axes, one more than the previous token's
largest) and runs of image / video placeholder tokens. A run of an image or video of grid (t, h, w) patches
holds t * (h / m) * (w / m) tokens (m: the vision config's `spatial_merge_size`) laid out t-major; its
positions are `start + (time index * interval, row, column)`, with interval 1 for an image and
`tokens_per_second * second_per_grid_t` for a video, and the next text token starts at
`start + max(h, w) / m`. This is exactly what HF's `Qwen2_5_VLModel.get_rope_index` computes (transformers
5.25: runs are found from `mm_token_type_ids`, 0 text / 1 image / 2 video; the grids and the videos' seconds
are consumed in order over the whole batch; padded positions, `attention_mask == 0`, stay 0). Here it needs no
model, and refuses a run whose token count does not match its grid (HF would silently shift every later
position).

Qwen3-VL (`per_frame_videos`, the family's `VisionTower.per_frame_video_positions`) positions a video frame by frame:
each temporal patch of a video's grid (t, h, w) is a grid (1, h, w) of its own, its run of tokens separated from the
next frame's by text (the processor's timestamps), and `tokens_per_second` / seconds per grid play no part: exactly
HF's `Qwen3VLModel.get_rope_index`.

`packed_rope_index` is the per-document variant for packed rows: each document's positions restart at 0, as if
it were a row of its own.
"""

from __future__ import annotations

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """0 for text, 1 for image placeholder tokens, 2 for video placeholder tokens (what HF's processor returns)."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = IMAGE
    if video_token_id is not None:
        types[input_ids == video_token_id] = VIDEO
    return types


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """(token type, start, end) of each run of equal types."""
    runs = []
    for kind, group in itertools.groupby(enumerate(types), lambda item: item[1]):
        group = list(group)
        runs.append((kind, group[0][0], group[-1][0] + 1))
    return runs


def _vision_positions(start, grid_thw: torch.Tensor, spatial_merge_size: int, time_interval) -> torch.Tensor:
    """[3, t * h/m * w/m] positions of one image / video starting at `start` (HF's get_vision_position_ids)."""
    t, h, w = (int(grid_thw[0]), int(grid_thw[1]) // spatial_merge_size, int(grid_thw[2]) // spatial_merge_size)
    temporal = (torch.arange(t) * time_interval).long()  # the interval may be fractional: floored as HF does
    grid = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    positions = torch.stack(grid, dim=0).reshape(3, -1)
    positions[0] += start  # after the interval's scaling, as HF
    return positions


def _row_positions(
    types: torch.Tensor, grids: dict, seconds, spatial_merge_size: int, tokens_per_second: int
) -> torch.Tensor:
    """[3, len(types)] positions of one row (its unpadded tokens), consuming grids / seconds from the iterators."""
    current = 0
    pieces = []
    for kind, start, end in _runs(types.tolist()):
        if kind == TEXT:
            pieces.append(torch.arange(end - start).view(1, -1).expand(3, -1) + current)
            current += end - start
            continue
        if kind not in (IMAGE, VIDEO):
            raise ValueError(f"mm_token_type_ids holds {kind}: 0 (text), 1 (image) or 2 (video) expected")
        name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
        if grids[kind] is None:
            raise ValueError(f"the row has {'image' if kind == IMAGE else 'video'} tokens but no {name} was given")
        grid = next(grids[kind], None)
        if grid is None:
            raise ValueError(f"more {'image' if kind == IMAGE else 'video'} token runs than {name} rows")
        expected = int(grid.prod()) // spatial_merge_size**2
        if end - start != expected:
            raise ValueError(
                f"a run of {end - start} {'image' if kind == IMAGE else 'video'} tokens for {name} {grid.tolist()}, "
                f"which needs {expected} (t * h * w / spatial_merge_size**2)"
            )
        interval = tokens_per_second * next(seconds) if kind == VIDEO else 1
        pieces.append(_vision_positions(current, grid, spatial_merge_size, interval))
        current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _media(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, per_frame_videos: bool):
    """(grid iterators by token type, the videos' seconds per grid, tokens_per_second) the rows consume in order."""
    if per_frame_videos:
        if video_grid_thw is not None:  # each temporal patch a grid (1, h, w) of its own, as HF's Qwen3-VL
            video_grid_thw = torch.repeat_interleave(video_grid_thw.cpu(), video_grid_thw[:, 0].cpu(), dim=0)
            video_grid_thw[:, 0] = 1
        second_per_grid_ts, tokens_per_second = None, 1  # a single time step per frame: no interval to scale
    elif video_grid_thw is not None and tokens_per_second is None:
        raise ValueError("video positions need the vision config's tokens_per_second")
    grids = {
        IMAGE: iter(image_grid_thw.cpu()) if image_grid_thw is not None else None,
        VIDEO: iter(video_grid_thw.cpu()) if video_grid_thw is not None else None,
    }
    seconds = iter(second_per_grid_ts.cpu()) if second_per_grid_ts is not None else itertools.repeat(1)
    return grids, seconds, tokens_per_second


def position_settings(vision, vision_config: dict) -> dict:
    """`rope_index` / `packed_rope_index` keyword arguments of a family's `VisionTower` and its vision config."""
    return dict(
        spatial_merge_size=vision_config["spatial_merge_size"],
        tokens_per_second=vision_config.get("tokens_per_second"),
        per_frame_videos=vision.per_frame_video_positions,
    )


def rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    tokens_per_second: float | None,
    per_frame_videos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [3, b, s] of input_ids' dtype, rope deltas [b, 1]: largest position + 1 - unpadded length), as HF's
    `get_rope_index`. Text-only rows get 0..n-1 on every axis; padded positions (attention_mask 0) get 0."""
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=input_ids.dtype, device=input_ids.device)
    grids, seconds, tokens_per_second = _media(
        image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, per_frame_videos
    )
    deltas = []
    for row in range(batch):
        types = mm_token_type_ids[row].cpu()
        keep = attention_mask[row].cpu().bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool)
        row_positions = _row_positions(types[keep], grids, seconds, spatial_merge_size, tokens_per_second)
        positions[:, row, keep.to(positions.device)] = row_positions.to(positions)
        largest = int(row_positions.max()) if row_positions.numel() else -1
        deltas.append(largest + 1 - int(keep.sum()))
    return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def packed_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    tokens_per_second: float | None,
    per_frame_videos: bool = False,
) -> torch.Tensor:
    """Positions [3, 1, total] of one packed row [1, total] of documents (`cu_seqlens`: their boundaries, [0, ...,
    total]); each document is positioned as a row of its own (restarting at 0), its images / videos taken in order
    from the grids. Tokens after the last boundary (padding) get 0."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"packed_rope_index takes one packed row [1, total], got {list(input_ids.shape)}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or any(later < earlier for earlier, later in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens={bounds}: non-decreasing from 0 expected")
    if bounds[-1] > input_ids.shape[1]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]}, beyond the row's {input_ids.shape[1]} tokens")
    positions = torch.zeros(3, 1, input_ids.shape[1], dtype=input_ids.dtype, device=input_ids.device)
    grids, seconds, tokens_per_second = _media(
        image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, per_frame_videos
    )
    types = mm_token_type_ids[0].cpu()
    for start, end in itertools.pairwise(bounds):
        document = _row_positions(types[start:end], grids, seconds, spatial_merge_size, tokens_per_second)
        positions[:, 0, start:end] = document.to(positions)
    for kind, remaining in grids.items():
        if remaining is not None and next(remaining, None) is not None:
            raise ValueError(f"more {'image' if kind == IMAGE else 'video'} grids than token runs in the packed row")
    return positions


def model_positions(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    args,
) -> torch.Tensor:
    """Positions [3, b, s] of a batch for the vision-language model `args` (GPTModelArgs) describes: what the
    training data's collates call (`functools.partial(model_positions, args=args)`)."""
    positions, _ = rope_index(
        input_ids,
        mm_token_type_ids(input_ids, args.image_token_id, args.video_token_id),
        image_grid_thw,
        video_grid_thw,
        attention_mask=attention_mask,
        **position_settings(args.vision, args.vision_config),
    )
    return positions
