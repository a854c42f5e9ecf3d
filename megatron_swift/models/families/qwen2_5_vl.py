"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, model_type qwen2_5_vl): a Qwen2 decoder (q/k/v biases, RMSNorm,
SwiGLU) with multimodal rope (`rope_parameters.mrope_section`: head_dim / 2 split over temporal, height and width
positions, models/rope_index.py), behind HF's own vision tower (window-attention ViT + patch merger), whose
features replace the embeddings of the image / video placeholder tokens (models/vlm.py).

Checkpoints are read in both HF layouts, the hub's (`model.layers.*`, `visual.*`, what the published checkpoints
and vLLM use) and transformers 5's module names (`model.language_model.*`, `model.visual.*`); exports write the
hub's. Refused, naming the field: context parallelism with the tower (models/layout.py).
"""

from megatron_swift.models.families.common import DENSE_DECODER, TINY_DENSE
from megatron_swift.models.family import Family, VisionTower, register
from megatron_swift.models.mapping import Rename, RuleSet

TOWER = VisionTower(
    hf_class="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
    special_tokens=(
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ),
)

MAPPING = RuleSet(
    (*DENSE_DECODER.rules, Rename(f"{TOWER.module_name}.{{path}}", hf_name="visual.{path}")),
    ignore_hf=DENSE_DECODER.ignore_hf,
    hf_aliases=(("model.language_model.", "model."), ("model.visual.", "visual.")),
)

# Qwen/Qwen2.5-VL-7B-Instruct config.json, every field kept but `torch_dtype` and `transformers_version` (written
# by save_pretrained), nested as transformers 5 holds it (the hub file has the text fields at the top level and
# `rope_scaling: {type: mrope, mrope_section}`, which transformers 5 reads as this).
QWEN2_5_VL_7B_CONFIG = dict(
    text_config=dict(
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        hidden_act="silu",
        hidden_size=3584,
        initializer_range=0.02,
        intermediate_size=18944,
        max_position_embeddings=128000,
        max_window_layers=28,
        num_attention_heads=28,
        num_hidden_layers=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-06,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        sliding_window=32768,
        use_cache=True,
        use_sliding_window=False,
        vocab_size=152064,
    ),
    vision_config=dict(
        depth=32,
        hidden_act="silu",
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_chans=3,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        spatial_patch_size=14,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        temporal_patch_size=2,
    ),
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    image_token_id=151655,
    video_token_id=151656,
    tie_word_embeddings=False,
)

# Sizes shrunk: the text model is the tiny dense decoder (head_dim 16: mrope_section [2, 3, 3] keeps 16:24:24's
# proportions over head_dim / 2 = 8) with room for the tokenizer's 4 vision tokens; the tower has 2 blocks (block 0
# windowed, block 1 full attention), 4-pixel patches, and windows of 16 pixels = 2 x 2 merged patches, so images of
# more than 8 x 8 pixels span several windows. The vision token ids are those the tiny tokenizer gives its vision
# special tokens (appended after its 384 tokens, in `TOWER.special_tokens` order; the tiny-model maker checks).
TINY = dict(
    QWEN2_5_VL_7B_CONFIG,
    text_config=dict(
        QWEN2_5_VL_7B_CONFIG["text_config"],
        **{key: TINY_DENSE[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        num_attention_heads=TINY_DENSE["num_attention_heads"],
        num_key_value_heads=TINY_DENSE["num_key_value_heads"],
        max_position_embeddings=512,
        max_window_layers=4,
        sliding_window=512,
        vocab_size=392,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3]),
    ),
    vision_config=dict(
        QWEN2_5_VL_7B_CONFIG["vision_config"],
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=TINY_DENSE["hidden_size"],
        patch_size=4,
        spatial_patch_size=4,
        window_size=16,
        fullatt_block_indexes=[1],
    ),
    bos_token_id=None,
    eos_token_id=None,
    vision_start_token_id=384,
    vision_end_token_id=385,
    vision_token_id=None,  # no <|vision_pad|> in the tiny tokenizer
    image_token_id=386,
    video_token_id=387,
)

QWEN2_5_VL = register(
    Family(
        name="qwen2_5_vl",
        model_type="qwen2_5_vl",
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        mapping=MAPPING,
        qkv_bias=True,
        rope_types=("default",),
        vision=TOWER,
        tiny_config=TINY,
    )
)
