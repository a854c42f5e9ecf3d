"""`check`: run the HF model and the converted megatron-core model on the same tokens, compare logits.

The HF implementation is the reference. Both sides run in fp32; the megatron side runs at the
requested TP/PP layout (loading the checkpoint resharded), through the same pipeline schedule as
training.

A vision-language family is checked on text + images (`sample_vision_batch`): rows with images of different sizes
and a right-padded text-only row; HF computes its own 3-D rope positions, ours come from models/rope_index.py, and
logits are compared at the unpadded positions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from converters.convert import build_chunks, conversion_world_size, model_args_for_checkpoint
from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed, run_workers
from megatron_swift.models.forward import forward_logits
from megatron_swift.models.layout import model_layout_problems


def _batch_parts(batch) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """(tokens, position ids, model inputs) of a token tensor or a `sample_vision_batch` dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    return batch["input_ids"], batch["position_ids"], batch["inputs"]


def logits_in_this_world(mcore_dir: str | Path, parallel: ParallelConfig, tokens):
    """Initialise `parallel` in the running world, load the checkpoint, return its fp32 logits on the
    one rank that reports them (last pipeline stage, TP and DP rank 0), None on the others. `tokens`: a token
    tensor, or a `sample_vision_batch` dict."""
    from megatron.core import parallel_state as ps

    init_distributed(parallel)
    _, args = model_args_for_checkpoint(mcore_dir)
    chunks = build_chunks(args, parallel, torch.float32)
    load_model(chunks, full_model_weights_dir(Path(mcore_dir)))
    tokens, position_ids, inputs = _batch_parts(tokens)
    logits = forward_logits(chunks, tokens, args.vocab_size, position_ids=position_ids, inputs=inputs)
    reporting = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return logits if reporting else None


def _mcore_logits_worker(mcore_dir: str, parallel: dict, tokens: torch.Tensor):
    try:
        return logits_in_this_world(mcore_dir, ParallelConfig(**parallel), tokens)
    finally:
        destroy_distributed()


def mcore_logits(mcore_dir: str | Path, tokens: torch.Tensor, parallel: ParallelConfig | None = None):
    """fp32 logits [batch, seq, vocab] of a megatron-swift checkpoint loaded at `parallel`'s layout."""
    parallel = parallel or ParallelConfig()
    _, args = model_args_for_checkpoint(mcore_dir)
    problems = model_layout_problems(args, parallel)
    if problems:
        raise ConfigError("the model cannot be split this way:\n  " + "\n  ".join(problems))
    results = run_workers(
        _mcore_logits_worker, conversion_world_size(parallel), str(mcore_dir), dataclasses.asdict(parallel), tokens
    )
    return next(r for r in results if r is not None)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens) -> torch.Tensor:
    """The HF model's fp32 logits for a token tensor, or for a `sample_vision_batch` dict (HF's own inputs: mask,
    pixels, grids, token types; it computes its 3-D positions itself)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.models.family import family_for

    vision = family_for(load_hf_config(Path(hf_dir))).vision is not None
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    if isinstance(tokens, torch.Tensor):
        return model(tokens).logits.float()
    return model(**tokens["hf"]).logits.float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    diff = (reference - candidate).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
    }


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Images of `sample_vision_batch` (grids t, h, w in patches), per row; the last row is text only, right-padded.
VISION_ROWS = (((1, 8, 6),), ((1, 4, 4), (1, 6, 4)), ())


def sample_vision_batch(hf_config, seq: int = 32, seed: int = 0, rows=VISION_ROWS, padding: int = 10) -> dict:
    """A batch of rows holding images of different sizes (`rows`: each row's image grids) between random text, the
    last row text only with `padding` pad tokens at the end (attention_mask 0). Returns {"input_ids",
    "attention_mask", "position_ids" (ours, [3, b, s]), "inputs" (our model's image keyword arguments), "hf" (HF's
    forward arguments)}. Pixels are random, [patches, channels * temporal_patch * patch * patch] as HF's processor
    lays them out."""
    from megatron_swift.models import translate
    from megatron_swift.models.rope_index import mm_token_type_ids, model_positions

    args = translate(hf_config)
    vision = args.vision_config
    merge = vision["spatial_merge_size"]
    start_id, end_id = (getattr(hf_config, field) for field in ("vision_start_token_id", "vision_end_token_id"))
    special = {args.image_token_id, args.video_token_id, start_id, end_id}
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, args.vocab_size, (len(rows), seq), generator=generator)
    for token in special - {None}:  # random text never holds a vision token
        input_ids[input_ids == token] = 0
    attention_mask = torch.ones_like(input_ids)
    grids = []
    for row, images in enumerate(rows):
        at = 2
        for grid in images:
            count = grid[0] * grid[1] * grid[2] // merge**2
            input_ids[row, at] = start_id
            input_ids[row, at + 1 : at + 1 + count] = args.image_token_id
            input_ids[row, at + 1 + count] = end_id
            at += count + 4  # two text tokens between images
            grids.append(grid)
        if at > seq:
            raise ValueError(f"the images of row {row} need {at} tokens, more than seq={seq}")
        if not images and padding:
            input_ids[row, -padding:] = getattr(hf_config.get_text_config(), "pad_token_id", None) or 0
            attention_mask[row, -padding:] = 0
    image_grid_thw = torch.tensor(grids, dtype=torch.long)
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    pixel_values = torch.randn(int(image_grid_thw.prod(-1).sum()), patch_dim, generator=generator)
    types = mm_token_type_ids(input_ids, args.image_token_id, args.video_token_id)
    position_ids = model_positions(input_ids, image_grid_thw, None, attention_mask, args=args)
    images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "inputs": images,
        "hf": {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types, **images},
    }


def compare_valid(reference: torch.Tensor, candidate: torch.Tensor, batch) -> dict:
    """`compare_logits` over the positions a batch's attention mask keeps (all of a plain token tensor's)."""
    if isinstance(batch, torch.Tensor):
        return compare_logits(reference, candidate)
    keep = batch["attention_mask"].bool()
    return compare_logits(reference[keep], candidate[keep])


def check(
    hf_dir, mcore_dir, parallel: ParallelConfig | None = None, batch: int = 2, seq: int = 32, seed: int = 0
) -> dict:
    """HF vs ours on `batch` random rows of `seq` tokens; a vision-language model on `sample_vision_batch`'s rows
    (text + images of different sizes, and a padded text-only row) instead."""
    _, args = model_args_for_checkpoint(mcore_dir)
    if args.sliding_window and seq > args.sliding_window:
        raise ConfigError(f"--seq {seq} exceeds the model's sliding_window {args.sliding_window}")
    if args.vision is not None:
        from megatron_swift.checkpoint.hf import load_hf_config

        tokens = sample_vision_batch(load_hf_config(Path(hf_dir)), seq=seq, seed=seed)
    else:
        tokens = sample_tokens(args.vocab_size, batch, seq, seed)
    return compare_valid(hf_logits(hf_dir, tokens), mcore_logits(mcore_dir, tokens, parallel), tokens)
