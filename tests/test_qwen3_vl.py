"""Qwen3-VL against HF transformers' Qwen3VLForConditionalGeneration / Qwen3VLModel as the reference.

The tiny model also runs through every family-wide test: the bit-exact round trip (test_roundtrip.py), logits on
text + images at TP1 (test_check.py's `check`) and at TP2 / TP2 + SP / PP2 in test_check.py's two-rank launch (PP2's
default split keeps both DeepStack layers on the first stage). Here: the 3-D rope positions against HF's
`get_rope_index` (videos frame by frame), the interleaved rotary frequencies against HF's rotary module, the
translation and refusals (DeepStack layers off the first pipeline stage; full recompute under pipeline parallelism),
a video (frames behind timestamp text) with images and a packed THD row of documents with images against HF's logits
at TP1, the export loaded by transformers' class with no missing or unexpected keys, the DeepStack levels and the
interleave mattering to HF's logits (so the logits checks guard them), gradients reaching the tower (DeepStack
mergers included) as HF's (bitwise the same on both ranks at TP2 / TP2 + SP in test_qwen2_5_vl.py's two-rank
launch, which covers every vision-language family), and the first training step's loss on an image batch equal to HF's.
"""

import functools
import types

import pytest
import torch

from converters.check import hf_logits, sample_vision_batch
from converters.convert import hf_to_mcore, mcore_to_hf
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.models import all_families, translate
from megatron_swift.models.layout import model_layout_problems
from megatron_swift.models.rope_index import IMAGE, TEXT, VIDEO, packed_rope_index, rope_index
from megatron_swift.models.tiny import tiny_hf_config
from tests.test_roundtrip import assert_bit_exact

FAMILY = "qwen3_vl"
MERGE = 2
QWEN3 = {"spatial_merge_size": MERGE, "tokens_per_second": None, "per_frame_videos": True}


def _config(**overrides):
    return tiny_hf_config(all_families()[FAMILY], **overrides)


def _hf_get_rope_index():
    """HF's Qwen3VLModel.get_rope_index, bound to a stand-in holding only the config it reads."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    stand_in = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=MERGE))
    )
    stand_in.get_vision_position_ids = functools.partial(Qwen3VLModel.get_vision_position_ids, stand_in)
    return functools.partial(Qwen3VLModel.get_rope_index, stand_in)


def _random_rows(generator, rows: int, seq: int, padding_side: str):
    """Token types of rows of random text, images and videos (each video's frames a run of its own, text between
    them as the processor's timestamps), every third row text only, odd rows padded; returns (types, attention
    mask, image grids, video grids)."""
    types_ = torch.zeros(rows, seq, dtype=torch.int32)
    mask = torch.ones(rows, seq, dtype=torch.long)
    images, videos = [], []
    randint = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    for row in range(rows):
        length = seq - randint(0, 6) if row % 2 else seq
        pieces = []
        while row % 3 != 2:
            kind = IMAGE if torch.rand(1, generator=generator) < 0.5 else VIDEO
            t = 1 if kind == IMAGE else randint(1, 4)
            h, w = 2 * randint(1, 4), 2 * randint(1, 4)
            frame = [TEXT] * randint(1, 3) + [kind] * (h * w // MERGE**2)
            if len(pieces) + t * len(frame) + 1 > length:
                break
            pieces += frame * t
            (images if kind == IMAGE else videos).append((t, h, w))
        pieces += [TEXT] * (length - len(pieces))
        offset = seq - length if padding_side == "left" else 0
        types_[row, offset : offset + length] = torch.tensor(pieces, dtype=torch.int32)
        mask[row, :] = 0
        mask[row, offset : offset + length] = 1
    as_tensor = lambda grids: torch.tensor(grids, dtype=torch.long) if grids else None  # noqa: E731
    return types_, mask, as_tensor(images), as_tensor(videos)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rope_index_equals_hf(padding_side, seed):
    generator = torch.Generator().manual_seed(seed)
    types_, mask, images, videos = _random_rows(generator, rows=6, seq=80, padding_side=padding_side)
    assert images is not None and videos is not None and (videos[:, 0] > 1).any() and (mask == 0).any()
    input_ids = torch.randint(0, 100, types_.shape, generator=generator)
    hf = _hf_get_rope_index()
    kwargs = dict(image_grid_thw=images, video_grid_thw=videos, attention_mask=mask)
    expected, expected_deltas = hf(input_ids, mm_token_type_ids=types_, **kwargs)
    given = videos.clone()
    ours, deltas = rope_index(input_ids, types_, **kwargs, **QWEN3)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected) and torch.equal(deltas, expected_deltas)
    assert torch.equal(videos, given)  # the caller's grids are not rewritten
    # Qwen2.5-VL's positions (a video's frames one grid, time scaled) are not these: the per-frame switch matters.
    chunked = dict(QWEN3, per_frame_videos=False, tokens_per_second=2)
    with pytest.raises(ValueError, match="video tokens"):
        rope_index(input_ids, types_, **kwargs, **chunked)
    del kwargs["attention_mask"]
    expected, _ = hf(input_ids, mm_token_type_ids=types_, **kwargs)
    assert torch.equal(rope_index(input_ids, types_, **kwargs, **QWEN3)[0], expected)


def test_packed_rope_index_positions_each_document_as_hf_alone():
    generator = torch.Generator().manual_seed(7)
    types_, _, images, videos = _random_rows(generator, rows=2, seq=60, padding_side="right")
    hf = _hf_get_rope_index()
    image_rows = [len([k for k in _runs(types_[r]) if k == IMAGE]) for r in range(2)]
    video_rows = [len([k for k in _runs(types_[r]) if k == VIDEO]) for r in range(2)]
    expected, at_image, at_video = [], 0, 0
    for row in range(2):
        n_videos = _videos_in(videos[at_video:], video_rows[row])
        grids_i = images[at_image : at_image + image_rows[row]] if image_rows[row] else None
        grids_v = videos[at_video : at_video + n_videos] if n_videos else None
        doc = types_[row : row + 1]
        expected.append(hf(torch.zeros_like(doc, dtype=torch.long), mm_token_type_ids=doc, image_grid_thw=grids_i,
                           video_grid_thw=grids_v)[0])  # fmt: skip
        at_image, at_video = at_image + image_rows[row], at_video + n_videos
    packed = types_.reshape(1, -1)
    ours = packed_rope_index(packed.long(), packed, torch.tensor([0, 60, 120]), images, videos, **QWEN3)
    assert torch.equal(ours, torch.cat(expected, dim=2))


def _runs(types_row) -> list[int]:
    import itertools

    return [kind for kind, _ in itertools.groupby(types_row.tolist()) if kind != TEXT]


def _videos_in(videos, frame_runs: int) -> int:
    """How many of `videos` (in order) a row with `frame_runs` video frame runs holds."""
    count = 0
    while frame_runs > 0:
        frame_runs -= int(videos[count, 0])
        count += 1
    return count


def test_interleaved_rotary_equals_hf_rotary_module():
    """Our rotary frequencies (megatron-core applies cos / sin of them) against HF's Qwen3VLTextRotaryEmbedding's
    cos / sin for random 3-D positions; megatron-core's chunked multimodal rope gives other values."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megatron_swift.models.interleaved_mrope import InterleavedMultimodalRotaryEmbedding

    text = _config().text_config
    sections = text.rope_parameters["mrope_section"]
    positions = torch.randint(0, 400, (3, 2, 24), generator=torch.Generator().manual_seed(0))
    cos, sin = Qwen3VLTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, head_dim]
    # What GPTModel's MultimodalRotaryEmbedding holds (megatron-core's inverse frequencies for rotary_base 5e6).
    chunked = types.SimpleNamespace(
        inv_freq=1.0 / (5000000.0 ** (torch.arange(0, text.head_dim, 2, dtype=torch.float32) / text.head_dim)),
        seq_len_interpolation_factor=None,
        rotary_interleaved=False,
        cp_group=None,
    )
    ours = InterleavedMultimodalRotaryEmbedding(chunked)(positions, sections)  # [s, b, 1, head_dim]
    assert ours.shape == (24, 2, 1, text.head_dim)
    freqs = ours[:, :, 0].transpose(0, 1)
    assert torch.equal(freqs.cos(), cos) and torch.equal(freqs.sin(), sin)
    megatron_chunked = MultimodalRotaryEmbedding.forward(chunked, positions, sections)
    assert not torch.allclose(megatron_chunked[:, :, 0].transpose(0, 1).cos(), cos, atol=1e-3)


def test_translation_and_refusals():
    from megatron_swift.models.interleaved_mrope import interleaved_sections_problem

    args = translate(_config())
    assert args.position_embedding_type == "mrope" and args.transformer["mrope_section"] == [6, 5, 5]
    assert args.transformer["qk_layernorm"] and not args.transformer["add_qkv_bias"]
    assert args.transformer["kv_channels"] == 32 and args.share_embeddings_and_output_weights
    assert args.vision_config["deepstack_visual_indexes"] == [0, 1] and (args.image_token_id, args.video_token_id) == (
        386,
        387,
    )
    assert interleaved_sections_problem([6, 5, 5]) is None
    assert "interleaved multimodal rope needs" in interleaved_sections_problem([2, 7, 7])
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    assert not model_layout_problems(args, pp2)  # 2 + 2 layers: both DeepStack layers on the first stage
    vision = dict(all_families()[FAMILY].tiny_config["vision_config"], deepstack_visual_indexes=[0, 1, 2])
    deeper = translate(_config(vision_config=vision))
    (problem,) = model_layout_problems(deeper, pp2)
    assert "vision_config.deepstack_visual_indexes adds the vision tower's features after the first 3" in problem
    assert "set parallel.decoder_first_pipeline_num_layers to at least 3" in problem
    assert not model_layout_problems(deeper, ParallelConfig(pipeline_model_parallel_size=2,
                                                             decoder_first_pipeline_num_layers=3))  # fmt: skip
    problems = model_layout_problems(args, ParallelConfig(context_parallel_size=2))
    assert any("parallel.context_parallel_size=2 is not supported with a vision tower" in p for p in problems)
    text = dict(all_families()[FAMILY].tiny_config["text_config"], rope_parameters={"rope_type": "default"})
    with pytest.raises(ConfigError, match=r"rope_parameters\.mrope_section is missing: qwen3_vl's decoder"):
        translate(_config(text_config=text))


def test_export_is_what_transformers_loads(tiny_models, converted, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, Qwen3VLForConditionalGeneration

    source = tiny_models[FAMILY]
    tensors = load_file(source / "model.safetensors")
    assert "model.visual.deepstack_merger_list.1.linear_fc2.weight" in tensors and "lm_head.weight" not in tensors
    exported = mcore_to_hf(hf_to_mcore(source, tmp_path / "mcore"), tmp_path / "hf")
    assert_bit_exact(source, exported)
    for cls in (Qwen3VLForConditionalGeneration, AutoModelForImageTextToText):
        _, info = cls.from_pretrained(exported, output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_deepstack_and_interleave_change_hf_logits(tiny_models):
    """The logits checks guard both: HF's own logits move with the DeepStack levels dropped or the rope chunked."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model = AutoModelForImageTextToText.from_pretrained(tiny_models[FAMILY], dtype=torch.float32)
    batch = sample_vision_batch(model.config)
    with torch.no_grad():
        reference = model(**batch["hf"]).logits
        rotary = model.model.language_model.rotary_emb

        def chunked(freq):  # Qwen2.5-VL's layout: sections of t, h, w channels one after the other
            sections = freq.split(rotary.mrope_section, dim=-1)
            mixed = torch.cat([section[axis] for axis, section in enumerate(sections)], dim=-1)
            return torch.cat((mixed, mixed), dim=-1)

        rotary.recomposition_frequencies = chunked
        moved_rope = (model(**batch["hf"]).logits - reference).abs().max()
        del rotary.recomposition_frequencies
        original = modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process
        modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process = lambda self, hidden, mask, embeds: hidden
        try:
            moved_deepstack = (model(**batch["hf"]).logits - reference).abs().max()
        finally:
            modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process = original
    assert moved_rope > 1e-2 and moved_deepstack > 1e-2, (moved_rope, moved_deepstack)


def test_gradients_reach_the_tower_and_its_deepstack_mergers_as_hf(tiny_models, converted):
    from tests.test_qwen2_5_vl import _hf_tower_gradients, _tower_gradients, _worst_relative

    batch = sample_vision_batch(_config())
    expected = _hf_tower_gradients(tiny_models[FAMILY], batch)
    (got,) = _tower_gradients(str(converted[FAMILY]), [{}], batch)
    assert any(name.startswith("deepstack_merger_list.") for name in expected)
    assert _worst_relative(got, expected) <= 1e-4


def test_first_training_step_equals_hf(tiny_models, vlm_sft_data, tmp_path):
    """One step on a global batch of image rows (and a text-only row): our loss is HF's on the same micro-batches."""
    from tests.test_vlm_training import DATA, _first_global_batch, _train, hf_loss
    from tests.train_matrix import job_for

    hf_dir = tiny_models[FAMILY]
    train = {"global_batch_size": 4, "micro_batch_size": 2, "train_iters": 1, "lr": 1e-3}
    job = job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path / "run"), {}, train, data=DATA)
    micro_batches = _first_global_batch(job, hf_dir)
    assert sum(len(batch["image_grid_thw"]) for batch in micro_batches) == 4
    results = _train(job)
    expected = hf_loss(hf_dir, micro_batches)
    assert abs(results[0].loss - expected) <= 1e-5, (results[0].loss, expected)


def test_full_recompute_under_pipeline_parallelism_is_refused(tiny_models, vlm_sft_data, tmp_path):
    """The DeepStack levels are held on the model from the embedding to the hooks: a recomputing backward of an
    earlier micro-batch under the pipeline schedule would add a later one's, so that layout is refused by name."""
    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.training.config import preflight
    from tests.train_matrix import job_for

    hf_dir = tiny_models[FAMILY]
    args = translate(load_hf_config(hf_dir))
    train = {"global_batch_size": 4, "micro_batch_size": 1, "train_iters": 1, "recompute_granularity": "full",
             "recompute_method": "uniform", "recompute_num_layers": 1}  # fmt: skip
    refused = "train.recompute_granularity=full with pipeline parallelism: qwen3_vl's DeepStack features"
    pp2 = job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path), {"pipeline_model_parallel_size": 2}, train)
    assert any(refused in problem for problem in preflight(pp2, 2, args))
    single = job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path), {}, train)
    assert not any(refused in problem for problem in preflight(single, 1, args))


def _our_logits(mcore_dir, input_ids, positions, inputs, packed_seq_params=None):
    """Our fp32 logits in a world of one process."""
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.forward import forward_logits

    init_distributed(ParallelConfig())
    try:
        _, args = model_args_for_checkpoint(mcore_dir)
        (model,) = build_chunks(args, ParallelConfig(), torch.float32)
        load_model([model], full_model_weights_dir(mcore_dir))
        return forward_logits([model], input_ids, args.vocab_size, packed_seq_params, positions, inputs)
    finally:
        destroy_distributed()


def test_video_frames_and_an_image_logits_at_tp1(tiny_models, converted):
    """A row with a video of 2 temporal patches (each frame behind its own timestamp text and vision start / end, as
    Qwen3-VL's processor lays it out) and an image, a row with an image: HF's joint DeepStack placement of image and
    video features and its per-frame positions, against ours."""
    from converters.check import compare_logits
    from megatron_swift.models.rope_index import mm_token_type_ids, position_settings

    config = _config()
    vision = config.vision_config
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 384, (2, 40), generator=generator)
    video, image = (2, 4, 4), (1, 4, 6)  # (t, h, w) patches: 2 frames of 4 tokens, 6 tokens
    layout = [  # (row, first token, tokens, placeholder)
        (0, 4, 4, config.video_token_id),
        (0, 12, 4, config.video_token_id),
        (0, 22, 6, config.image_token_id),
        (1, 5, 6, config.image_token_id),
    ]
    for row, at, count, token in layout:
        input_ids[row, at - 1] = config.vision_start_token_id
        input_ids[row, at : at + count] = token
        input_ids[row, at + count] = config.vision_end_token_id
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    video_grid, image_grid = torch.tensor([video]), torch.tensor([image, image])
    inputs = {
        "pixel_values_videos": torch.randn(int(video_grid.prod(-1).sum()), patch, generator=generator),
        "video_grid_thw": video_grid,
        "pixel_values": torch.randn(int(image_grid.prod(-1).sum()), patch, generator=generator),
        "image_grid_thw": image_grid,
    }
    types_ = mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id)
    settings = position_settings(translate(config).vision, vision.to_dict())
    positions, _ = rope_index(input_ids, types_, image_grid, video_grid, **settings)
    # Each frame an image of its own: time positions its start (4; then 4 + 2 merged rows + 4 tokens between = 10).
    assert positions[0, 0, 4:8].unique().tolist() == [4] and positions[0, 0, 12:16].unique().tolist() == [10]
    reference = hf_logits(tiny_models[FAMILY], {"hf": {"input_ids": input_ids, "mm_token_type_ids": types_, **inputs}})
    result = compare_logits(reference, _our_logits(converted[FAMILY], input_ids, positions, inputs))
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result


def test_packed_documents_with_images_give_each_rows_hf_logits(tiny_models, converted):
    """The check's rows (images of different sizes; text only) packed into one THD row: per-document positions and
    DeepStack levels placed over the packed row give each document HF's logits for its own row."""
    from megatron_swift.models.rope_index import mm_token_type_ids, position_settings
    from megatron_swift.training.step import packed_seq_params

    config = _config()
    batch = sample_vision_batch(config)
    keep = batch["attention_mask"].bool()
    reference = hf_logits(tiny_models[FAMILY], batch)[keep]
    documents = [batch["input_ids"][row][keep[row]] for row in range(keep.shape[0])]
    packed = torch.cat(documents).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *torch.cumsum(torch.tensor([len(d) for d in documents]), 0).tolist()])
    settings = position_settings(translate(config).vision, config.vision_config.to_dict())
    types_ = mm_token_type_ids(packed, config.image_token_id, config.video_token_id)
    positions = packed_rope_index(packed, types_, cu_seqlens, batch["inputs"]["image_grid_thw"], **settings)
    logits = _our_logits(converted[FAMILY], packed, positions, batch["inputs"], packed_seq_params(cu_seqlens))[0]
    worst = (logits - reference).abs().max().item()
    assert worst <= 1e-4, worst
