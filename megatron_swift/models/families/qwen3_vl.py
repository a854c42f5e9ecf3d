"""Qwen3-VL dense (Qwen3VLForConditionalGeneration, model_type qwen3_vl): a Qwen3 decoder (per-head q/k RMSNorm, no
qkv bias, explicit head_dim) with interleaved multimodal rope (`rope_parameters.mrope_section`, the t / h / w
frequency channels interleaved: models/interleaved_mrope.py; videos positioned frame by frame: models/rope_index.py),
behind HF's own vision tower (`Qwen3VLVisionModel`: learned position embeddings interpolated to each grid, patch
merger) whose DeepStack features (blocks `vision_config.deepstack_visual_indexes`, each through its own merger) are
added to the hidden states of the visual tokens after the first decoder layers (models/vlm.py).

Checkpoints hold transformers' own module names (`model.language_model.*`, `model.visual.*`, `lm_head.weight` when
untied), which exports write. Refused, naming the field: context parallelism with the tower, and pipeline splits
that put a DeepStack decoder layer off the first stage (models/layout.py).
"""

from dataclasses import fields, replace

from megatron_swift.models.families.common import DENSE_DECODER, QK_NORM, TINY_DENSE
from megatron_swift.models.family import Family, VisionTower, register
from megatron_swift.models.mapping import Rename, Rule, RuleSet

TOWER = VisionTower(
    hf_class="transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",
    # ms-swift's aligner: the patch merger and the DeepStack levels' mergers (both project into the decoder's width)
    aligner_modules=("merger", "deepstack_merger_list"),
    interleaved_mrope=True,
    per_frame_video_positions=True,
    deepstack_field="deepstack_visual_indexes",
    special_tokens=(
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ),
)


def _under_language_model(rule: Rule) -> Rule:
    """A decoder rule with its HF names (`model.*`) under transformers' `model.language_model.*`."""
    moved = {
        f.name: "model.language_model." + value.removeprefix("model.")
        for f in fields(rule)
        if f.name != "mcore" and isinstance(value := getattr(rule, f.name), str) and value.startswith("model.")
    }
    return replace(rule, **moved)


MAPPING = RuleSet(
    (
        *(_under_language_model(rule) for rule in DENSE_DECODER.rules + QK_NORM),
        Rename(f"{TOWER.module_name}.{{path}}", hf_name="model.visual.{path}"),
    ),
    ignore_hf=tuple(pattern.replace(r"^model\.", r"^model\.language_model\.") for pattern in DENSE_DECODER.ignore_hf),
)

# Qwen/Qwen3-VL-2B-Instruct config.json, every field kept but `dtype` / `transformers_version` (written by
# save_pretrained) and the sub-configs' `model_type`s (the classes' own), nested as transformers 5 holds it (the hub
# file's text `rope_scaling` {mrope_interleaved, mrope_section, rope_type} and `rope_theta` are read as this
# `rope_parameters`). transformers ignores `mrope_interleaved`: Qwen3-VL's rope is always interleaved.
QWEN3_VL_2B_CONFIG = dict(
    text_config=dict(
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        head_dim=128,
        hidden_act="silu",
        hidden_size=2048,
        initializer_range=0.02,
        intermediate_size=6144,
        max_position_embeddings=262144,
        num_attention_heads=16,
        num_hidden_layers=28,
        num_key_value_heads=8,
        rms_norm_eps=1e-06,
        rope_parameters=dict(
            rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True
        ),
        tie_word_embeddings=True,
        use_cache=True,
        vocab_size=151936,
    ),
    vision_config=dict(
        deepstack_visual_indexes=[5, 11, 17],
        depth=24,
        hidden_act="gelu_pytorch_tanh",
        hidden_size=1024,
        in_channels=3,
        initializer_range=0.02,
        intermediate_size=4096,
        num_heads=16,
        num_position_embeddings=2304,
        out_hidden_size=2048,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=True,
)

# Sizes shrunk: the tiny dense decoder with head_dim 32 decoupled from hidden_size / heads = 16 (as Qwen3's; 2B's
# 128 x 16 heads happens to equal its width), so mrope_section [6, 5, 5] keeps 24:20:20 over head_dim / 2 = 16 and
# the interleave covers channels 0..14 (15 the temporal's); room for the tokenizer's 4 vision tokens; tied, as 2B.
# The tower has 3 blocks, 4-pixel patches, a learned 4 x 4 position grid (interpolated to every image's grid) and
# DeepStack features of blocks 0 and 1, added after decoder layers 0 and 1 (both on the first stage of a 2-stage
# pipeline). The vision token ids are those the tiny tokenizer gives its vision special tokens (appended after its
# 384 tokens, in `TOWER.special_tokens` order; the tiny-model maker checks).
TINY = dict(
    QWEN3_VL_2B_CONFIG,
    text_config=dict(
        QWEN3_VL_2B_CONFIG["text_config"],
        **{key: TINY_DENSE[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        num_attention_heads=TINY_DENSE["num_attention_heads"],
        num_key_value_heads=TINY_DENSE["num_key_value_heads"],
        head_dim=32,
        max_position_embeddings=512,
        vocab_size=392,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters=dict(QWEN3_VL_2B_CONFIG["text_config"]["rope_parameters"], mrope_section=[6, 5, 5]),
    ),
    vision_config=dict(
        QWEN3_VL_2B_CONFIG["vision_config"],
        deepstack_visual_indexes=[0, 1],
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        num_position_embeddings=16,
        out_hidden_size=TINY_DENSE["hidden_size"],
        patch_size=4,
    ),
    vision_start_token_id=384,
    vision_end_token_id=385,
    image_token_id=386,
    video_token_id=387,
)

QWEN3_VL = register(
    Family(
        name="qwen3_vl",
        model_type="qwen3_vl",
        architectures=("Qwen3VLForConditionalGeneration",),
        mapping=MAPPING,
        qk_layernorm=True,
        rope_types=("default",),
        vision=TOWER,
        tiny_config=TINY,
    )
)
