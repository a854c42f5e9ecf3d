"""Qwen2.5-VL against HF transformers' Qwen2_5_VLForConditionalGeneration / Qwen2_5_VLModel as the reference.

The tiny model also runs through every family-wide test: the bit-exact round trip (test_roundtrip.py), logits on
text + images at TP1 (test_check.py's `check`, which samples images for a vision-language family) and on text only
and text + images at TP2 / TP2 + SP / PP2 in test_check.py's two-rank launch. Here: the 3-D rope positions against
HF's `get_rope_index` (images, videos, text-only and padded rows, packed documents), what the tiny model holds,
the translation and refusals, both HF layouts read, the export loaded by transformers' classes with no missing or
unexpected keys, text-only logits at TP1, a packed (THD) row of documents with images against HF's rows, and
gradients reaching the vision tower as HF's (TP1 in process; bitwise the same on both ranks at TP2 / TP2 + SP).
"""

import functools
import itertools
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.check import VISION_ROWS, hf_logits, sample_vision_batch
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.models import all_families, translate
from megatron_swift.models.layout import model_layout_problems
from megatron_swift.models.rope_index import IMAGE, TEXT, VIDEO, packed_rope_index, rope_index
from megatron_swift.models.tiny import tiny_hf_config
from tests.test_roundtrip import assert_bit_exact

FAMILY = "qwen2_5_vl"
MERGE = 2


def _config(**overrides):
    return tiny_hf_config(all_families()[FAMILY], **overrides)


def _hf_get_rope_index(tokens_per_second: int):
    """HF's Qwen2_5_VLModel.get_rope_index, bound to a stand-in holding only the config it reads."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second)
    )
    stand_in = types.SimpleNamespace(config=config)
    stand_in.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, stand_in)
    return functools.partial(Qwen2_5_VLModel.get_rope_index, stand_in)


def _random_rows(generator, rows: int, seq: int, padding_side: str):
    """Token types of `rows` rows: random text, images and videos of random grids (in order), some rows text only,
    some padded; returns (types, attention_mask, image grids, video grids, video seconds)."""
    types_ = torch.zeros(rows, seq, dtype=torch.int32)
    mask = torch.ones(rows, seq, dtype=torch.long)
    images, videos, seconds = [], [], []
    for row in range(rows):
        length = seq - int(torch.randint(0, 6, (1,), generator=generator)) if row % 2 else seq
        pieces, used = [], 0
        while row % 3 != 2:  # every third row is text only
            text = int(torch.randint(1, 4, (1,), generator=generator))
            kind = IMAGE if torch.rand(1, generator=generator) < 0.6 else VIDEO
            t = 1 if kind == IMAGE else int(torch.randint(1, 4, (1,), generator=generator))
            h, w = (2 * int(torch.randint(1, 5, (1,), generator=generator)) for _ in range(2))
            tokens = t * h * w // MERGE**2
            if used + text + tokens + 1 > length:
                break
            pieces += [TEXT] * text + [kind] * tokens
            used += text + tokens
            (images if kind == IMAGE else videos).append((t, h, w))
            if kind == VIDEO:
                seconds.append(float(torch.rand(1, generator=generator)) * 2 + 0.25)
        pieces += [TEXT] * (length - used)
        offset = seq - length if padding_side == "left" else 0
        types_[row, offset : offset + length] = torch.tensor(pieces, dtype=torch.int32)
        mask[row, :] = 0
        mask[row, offset : offset + length] = 1
    as_tensor = lambda grids: torch.tensor(grids, dtype=torch.long) if grids else None  # noqa: E731
    return types_, mask, as_tensor(images), as_tensor(videos), torch.tensor(seconds) if seconds else None


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rope_index_equals_hf(padding_side, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens_per_second = 2 + seed
    types_, mask, images, videos, seconds = _random_rows(generator, rows=6, seq=64, padding_side=padding_side)
    assert images is not None and videos is not None and (mask == 0).any()  # the cases this test is about
    input_ids = torch.randint(0, 100, types_.shape, generator=generator)
    hf = _hf_get_rope_index(tokens_per_second)
    kwargs = dict(image_grid_thw=images, video_grid_thw=videos, second_per_grid_ts=seconds, attention_mask=mask)
    expected, expected_deltas = hf(input_ids, mm_token_type_ids=types_, **kwargs)
    ours, deltas = rope_index(
        input_ids, types_, **kwargs, spatial_merge_size=MERGE, tokens_per_second=tokens_per_second
    )
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    assert torch.equal(deltas, expected_deltas)
    # Without an attention mask (every token counted) and without video seconds (1 each), as HF.
    del kwargs["attention_mask"], kwargs["second_per_grid_ts"]
    expected, _ = hf(input_ids, mm_token_type_ids=types_, **kwargs)
    ours, _ = rope_index(input_ids, types_, **kwargs, spatial_merge_size=MERGE, tokens_per_second=tokens_per_second)
    assert torch.equal(ours, expected)


def test_text_only_rows_get_plain_positions():
    input_ids = torch.arange(24).view(2, 12)
    ours, deltas = rope_index(
        input_ids, torch.zeros_like(input_ids, dtype=torch.int32), spatial_merge_size=2, tokens_per_second=2
    )
    assert torch.equal(ours, torch.arange(12).expand(3, 2, 12)) and torch.equal(deltas, torch.zeros(2, 1))


def test_packed_rope_index_restarts_each_document_as_hf_positions_it_alone():
    generator = torch.Generator().manual_seed(5)
    types_, _, images, videos, seconds = _random_rows(generator, rows=4, seq=40, padding_side="right")
    hf = _hf_get_rope_index(tokens_per_second=2)
    documents, expected = [], []
    images_left, videos_left, seconds_left = list(images), list(videos), list(seconds)
    for row in range(4):
        doc = types_[row : row + 1, : 30 + row]  # documents of different lengths
        kinds = [k for k, _ in itertools.groupby(doc[0].tolist()) if k != TEXT]
        n_img, n_vid = kinds.count(IMAGE), kinds.count(VIDEO)
        grids_i, images_left = images_left[:n_img], images_left[n_img:]
        grids_v, videos_left = videos_left[:n_vid], videos_left[n_vid:]
        secs, seconds_left = seconds_left[:n_vid], seconds_left[n_vid:]
        positions, _ = hf(
            torch.zeros_like(doc, dtype=torch.long),
            mm_token_type_ids=doc,
            image_grid_thw=torch.stack(grids_i) if grids_i else None,
            video_grid_thw=torch.stack(grids_v) if grids_v else None,
            second_per_grid_ts=torch.stack(secs) if secs else None,
        )
        documents.append(doc)
        expected.append(positions)
    packed_types = torch.cat(documents, dim=1)
    padding = 3
    packed_types = torch.cat([packed_types, torch.zeros(1, padding, dtype=torch.int32)], dim=1)
    bounds = torch.tensor([0, *torch.cumsum(torch.tensor([d.shape[1] for d in documents]), 0).tolist()])
    used_images = sum(1 for d in documents for k, _ in itertools.groupby(d[0].tolist()) if k == IMAGE)
    used_videos = sum(1 for d in documents for k, _ in itertools.groupby(d[0].tolist()) if k == VIDEO)
    ours = packed_rope_index(
        torch.zeros_like(packed_types, dtype=torch.long),
        packed_types,
        bounds,
        images[:used_images] if used_images else None,
        videos[:used_videos] if used_videos else None,
        seconds[:used_videos] if used_videos else None,
        spatial_merge_size=MERGE,
        tokens_per_second=2,
    )
    assert used_images and used_videos
    assert torch.equal(ours[:, :, : bounds[-1]], torch.cat(expected, dim=2))
    assert torch.equal(ours[:, :, bounds[-1] :], torch.zeros(3, 1, padding, dtype=torch.long))


def test_rope_index_refuses_a_run_that_does_not_match_its_grid():
    types_ = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"a run of 3 image tokens for image_grid_thw \[1, 4, 4\], which needs 4"):
        rope_index(types_.long(), types_, torch.tensor([[1, 4, 4]]), spatial_merge_size=2, tokens_per_second=2)
    with pytest.raises(ValueError, match="image tokens but no image_grid_thw"):
        rope_index(types_.long(), types_, spatial_merge_size=2, tokens_per_second=2)


def test_tiny_model_and_tokenizer(tiny_models):
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_models[FAMILY]
    tensors = load_file(path / "model.safetensors")
    assert "visual.merger.mlp.2.weight" in tensors and "visual.blocks.1.attn.qkv.bias" in tensors  # hub layout
    assert "model.layers.3.self_attn.q_proj.bias" in tensors and "lm_head.weight" in tensors  # untied, as 7B
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for field, token in all_families()[FAMILY].vision.special_tokens:
        assert tokenizer.convert_tokens_to_ids(token) == getattr(config, field), field
    assert config.vision_config.fullatt_block_indexes == [1] and config.vision_config.depth == 2
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


def test_translation_and_refusals():
    args = translate(_config())
    assert args.position_embedding_type == "mrope" and args.transformer["mrope_section"] == [2, 3, 3]
    assert args.transformer["add_qkv_bias"] and args.transformer["num_layers"] == 4
    assert args.vision_config["out_hidden_size"] == args.transformer["hidden_size"] == 64
    assert (args.image_token_id, args.video_token_id) == (386, 387) and not args.share_embeddings_and_output_weights
    text = dict(all_families()[FAMILY].tiny_config["text_config"])
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 3, 4])
    with pytest.raises(ConfigError, match=r"rope_parameters.mrope_section=\[2, 3, 4\]: three sections"):
        translate(_config(text_config=text))
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    with pytest.raises(ConfigError, match=r"rope_parameters\.mrope_section is missing: qwen2_5_vl's decoder"):
        translate(_config(text_config=text))
    problems = model_layout_problems(args, ParallelConfig(context_parallel_size=2))
    assert any("parallel.context_parallel_size=2 is not supported with a vision tower" in p for p in problems)


def test_reads_both_hf_layouts_and_exports_what_transformers_loads(tiny_models, converted, tmp_path):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    source = tiny_models[FAMILY]
    # transformers 5's module names (model.language_model.*, model.visual.*), as some exporters write them
    renamed = tmp_path / "t5_layout"
    renamed.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            (renamed / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    prefixes = (("model.", "model.language_model."), ("visual.", "model.visual."))
    moved = {}
    for name, tensor in tensors.items():
        new = next((new + name[len(old) :] for old, new in prefixes if name.startswith(old)), name)
        moved[new] = tensor
    assert "model.language_model.layers.0.mlp.up_proj.weight" in moved and "model.visual.merger.ln_q.weight" in moved
    save_file(moved, renamed / "model.safetensors", metadata={"format": "pt"})
    exported = mcore_to_hf(hf_to_mcore(renamed, tmp_path / "mcore"), tmp_path / "hf")
    assert_bit_exact(source, exported)  # written in the hub layout, every tensor as the source's

    for cls in (Qwen2_5_VLForConditionalGeneration, AutoModelForImageTextToText):
        model, info = cls.from_pretrained(exported, output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = sample_vision_batch(model.config)
    torch.testing.assert_close(hf_logits(exported, batch), hf_logits(source, batch), rtol=0, atol=0)


def _loss_inputs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token labels, mask of the unpadded positions) of a `sample_vision_batch` batch."""
    return torch.roll(batch["input_ids"], -1, dims=1), batch["attention_mask"].bool()


def _hf_tower_gradients(hf_dir, batch) -> dict[str, torch.Tensor]:
    """HF's vision tower gradients of the summed next-token cross entropy over the unpadded tokens."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    labels, keep = _loss_inputs(batch)
    logits = hf(**batch["hf"]).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    (per_token.view_as(labels) * keep).sum().backward()
    return {name: p.grad for name, p in hf.model.visual.named_parameters()}


def _tower_gradients(mcore_dir: str, layouts: list[dict], batch) -> list[dict[str, torch.Tensor]]:
    """Per layout, this rank's vision tower gradients of the same loss (megatron-core's per-token loss through the
    `labels` path, as training computes it); the model is loaded from the checkpoint at each layout."""
    return _tower_gradient_runs([(mcore_dir, layout, batch) for layout in layouts])


def _tower_gradient_runs(runs: list[tuple[str, dict, dict]]) -> list[dict[str, torch.Tensor]]:
    """`_tower_gradients` of each (checkpoint, layout, batch) run, in one process (of a launch's ranks)."""
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.distributed import destroy_distributed, init_distributed

    found = []
    try:
        for mcore_dir, layout, batch in runs:
            labels, keep = _loss_inputs(batch)
            parallel = ParallelConfig(**layout)
            init_distributed(parallel)
            _, args = model_args_for_checkpoint(mcore_dir)
            (model,) = build_chunks(args, parallel, torch.float32)
            load_model([model], full_model_weights_dir(Path(mcore_dir)))
            loss = model(batch["input_ids"], batch["position_ids"], None, labels=labels, **batch["inputs"])
            (loss * keep).sum().backward()
            found.append({name: p.grad.clone() for name, p in model.vision_model.named_parameters()})
    finally:
        destroy_distributed()
    return found


def _worst_relative(got: dict, expected: dict) -> float:
    assert sorted(got) == sorted(expected) and all(expected[n].abs().max() > 0 for n in expected)
    return max((got[n] - expected[n]).abs().max().item() / expected[n].abs().max().item() for n in expected)


def test_gradients_reach_the_vision_tower_as_hf_and_count_mismatch_is_refused(tiny_models, converted):
    """In one process (world of 1): the loss over text + images backwards into the tower; every tower gradient
    equals HF's. A batch whose placeholder count does not match its images is refused, naming both counts."""
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.distributed import destroy_distributed, init_distributed

    batch = sample_vision_batch(_config())
    expected = _hf_tower_gradients(tiny_models[FAMILY], batch)
    (got,) = _tower_gradients(str(converted[FAMILY]), [{}], batch)
    assert _worst_relative(got, expected) <= 1e-4

    init_distributed(ParallelConfig())
    try:
        _, args = model_args_for_checkpoint(converted[FAMILY])
        (model,) = build_chunks(args, ParallelConfig(), torch.float32)
        load_model([model], full_model_weights_dir(converted[FAMILY]))
        too_few = batch["input_ids"].clone()
        too_few[too_few == args.image_token_id] = 0
        refused = r"input_ids hold 0 image tokens \(id 386\) but the images give 22 features"
        with torch.no_grad(), pytest.raises(ValueError, match=refused):
            model(too_few, batch["position_ids"], None, **batch["inputs"])
    finally:
        destroy_distributed()


def test_tower_gradients_are_identical_on_every_tp_rank_and_hf_s(tiny_models, converted):
    """TP2 and TP2 + sequence parallel in one two-rank launch, for every vision-language family (Qwen3-VL's DeepStack
    levels are scattered over the sequence-parallel ranks as the embeddings): the replicated tower gets bitwise the
    same gradients on both ranks (so it needs no TP reduction), and they are HF's."""
    from megatron_swift.distributed import run_workers

    layouts = [{"tensor_model_parallel_size": 2}, {"tensor_model_parallel_size": 2, "sequence_parallel": True}]
    runs, expected = [], []
    for name, family in sorted(all_families().items()):
        if family.vision is None:
            continue
        batch = sample_vision_batch(tiny_hf_config(family))
        runs += [(str(converted[name]), layout, batch) for layout in layouts]
        expected += [(name, layout, _hf_tower_gradients(tiny_models[name], batch)) for layout in layouts]
    assert {name for name, _, _ in expected} >= {"qwen2_5_vl", "qwen3_vl"}
    rank0, rank1 = run_workers(_tower_gradient_runs, 2, runs)
    for (name, layout, reference), first, second in zip(expected, rank0, rank1, strict=True):
        assert all(torch.equal(first[n], second[n]) for n in first), (name, layout)
        assert _worst_relative(first, reference) <= 1e-4, (name, layout)


def test_text_only_logits_at_tp1(tiny_models, converted):
    """Text only (no pixels): our mrope positions are 0..s-1 on every axis, HF's its own text positions."""
    from converters.check import compare_logits, mcore_logits, sample_tokens

    tokens = sample_tokens(384, batch=2, seq=32, seed=1)
    result = compare_logits(hf_logits(tiny_models[FAMILY], tokens), mcore_logits(converted[FAMILY], tokens))
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_packed_documents_with_images_give_each_rows_hf_logits(tiny_models, converted):
    """The check's three rows (images of different sizes; text only) packed into one THD row: per-document positions
    (`packed_rope_index`) and megatron-core's packed attention give each document HF's logits for its own row."""
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.forward import forward_logits
    from megatron_swift.models.rope_index import mm_token_type_ids
    from megatron_swift.training.step import packed_seq_params

    config = _config()
    batch = sample_vision_batch(config)
    keep = batch["attention_mask"].bool()
    reference = hf_logits(tiny_models[FAMILY], batch)
    documents = [batch["input_ids"][row][keep[row]] for row in range(keep.shape[0])]
    packed = torch.cat(documents).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *torch.cumsum(torch.tensor([len(d) for d in documents]), 0).tolist()])
    positions = packed_rope_index(
        packed,
        mm_token_type_ids(packed, config.image_token_id, config.video_token_id),
        cu_seqlens,
        batch["inputs"]["image_grid_thw"],
        spatial_merge_size=MERGE,
        tokens_per_second=config.vision_config.tokens_per_second,
    )
    init_distributed(ParallelConfig())
    try:
        _, args = model_args_for_checkpoint(converted[FAMILY])
        (model,) = build_chunks(args, ParallelConfig(), torch.float32)
        load_model([model], full_model_weights_dir(converted[FAMILY]))
        logits = forward_logits(
            [model], packed, args.vocab_size, packed_seq_params(cu_seqlens), positions, batch["inputs"]
        )[0]
        # Without the boundaries later documents attend to earlier ones: the comparison has teeth. (A constant
        # offset of a document's positions would not show: rope scores depend on position differences only.)
        leaky = forward_logits([model], packed, args.vocab_size, None, positions, batch["inputs"])[0]
    finally:
        destroy_distributed()
    worst = (logits - reference[keep]).abs().max().item()
    assert worst <= 1e-4, worst
    later = slice(int(cu_seqlens[1]), None)
    assert (leaky[later] - reference[keep][later]).abs().max() > 1e-3


def test_video_and_image_logits_at_tp1(tiny_models, converted):
    """A row with a video (2 temporal patches, fractional seconds per grid: temporal positions scaled by
    tokens_per_second) and a row with an image: ours (positions from rope_index) against HF's forward."""
    from converters.check import compare_logits
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.forward import forward_logits
    from megatron_swift.models.rope_index import mm_token_type_ids

    config = _config()
    vision = config.vision_config
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 384, (2, 24), generator=generator)
    video, image = (4, 4, 4), (1, 4, 6)  # (t, h, w) patches: 8 and 6 tokens
    for row, grid, token in ((0, video, config.video_token_id), (1, image, config.image_token_id)):
        count = grid[0] * grid[1] * grid[2] // MERGE**2 // (2 if grid is video else 1)  # 2 frames per temporal patch
        input_ids[row, 3] = config.vision_start_token_id
        input_ids[row, 4 : 4 + count] = token
        input_ids[row, 4 + count] = config.vision_end_token_id
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    video_grid = torch.tensor([[video[0] // 2, video[1], video[2]]])  # temporal patches of 2 frames
    image_grid = torch.tensor([image])
    inputs = {
        "pixel_values_videos": torch.randn(int(video_grid.prod()), patch, generator=generator),
        "video_grid_thw": video_grid,
        "pixel_values": torch.randn(int(image_grid.prod()), patch, generator=generator),
        "image_grid_thw": image_grid,
    }
    seconds = torch.tensor([1.75])  # x tokens_per_second 2: the second temporal patch 3.5 -> 3 positions later
    types_ = mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id)
    assert (types_ == VIDEO).sum() == 8 and (types_ == IMAGE).sum() == 6
    positions, _ = rope_index(
        input_ids, types_, image_grid, video_grid, seconds, spatial_merge_size=MERGE,
        tokens_per_second=vision.tokens_per_second,
    )  # fmt: skip
    assert set(positions[0, 0, 4:12].tolist()) == {4, 7}  # start 4; the time axis scaled, floored
    reference = hf_logits(
        tiny_models[FAMILY],
        {"hf": {"input_ids": input_ids, "mm_token_type_ids": types_, "second_per_grid_ts": seconds, **inputs}},
    )
    init_distributed(ParallelConfig())
    try:
        _, args = model_args_for_checkpoint(converted[FAMILY])
        (model,) = build_chunks(args, ParallelConfig(), torch.float32)
        load_model([model], full_model_weights_dir(converted[FAMILY]))
        logits = forward_logits([model], input_ids, args.vocab_size, None, positions, inputs)
    finally:
        destroy_distributed()
    result = compare_logits(reference, logits)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_vision_batch_is_what_hf_positions(tiny_models):
    """The check's batch: images of different grids in different rows, a padded text-only row; our positions for it
    are HF's own (its model computes them from the token types)."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(tiny_models[FAMILY], dtype=torch.float32)
    batch = sample_vision_batch(hf.config)
    assert len({tuple(g) for g in batch["inputs"]["image_grid_thw"].tolist()}) == 3 and VISION_ROWS[-1] == ()
    assert (batch["attention_mask"][-1] == 0).any() and (batch["attention_mask"][:-1] == 1).all()
    expected, _ = hf.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["hf"]["mm_token_type_ids"],
        image_grid_thw=batch["inputs"]["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(batch["position_ids"], expected)
