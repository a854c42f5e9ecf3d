"""A tiny Qwen2.5-VL processor (tokenizer + image processor + chat template) for tests and examples, and
`load_processor`, which loads a model directory's processor (None for a text-only model).

The processor is HF's `Qwen2_5_VLProcessor` with Qwen2.5-VL-Instruct's real chat template and image-processor
settings; only the tokenizer is tiny (any tokenizer: the four vision tokens are added when it lacks them).

Videos need torchvision (transformers' video processors are torchvision-only). Without it a Qwen2.5-VL
processor cannot even be built by transformers (its constructor type-checks the video processor against a
class transformers only exports with torchvision), so `ImageOnlyQwen2_5_VLProcessor` stands in: the same
class (a subclass that changes nothing but that check and the name it is saved under), with no video
processor. Saved, it is an ordinary Qwen2.5-VL processor directory: `AutoProcessor.from_pretrained` loads it
where torchvision is installed, `load_processor` everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL-Instruct's chat_template.json, as published with the model (Qwen/Qwen2.5-VL-7B-Instruct; the same text
# is the Qwen2-VL processor fixture in huggingface/transformers tests/models/qwen2_vl/test_processor_qwen2_vl.py
# `prepare_processor_dict`, and the `processor_config.chat_template` of a qwen2_5_vl checkpoint's hub config).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-Instruct's preprocessor_config.json (the image processor's settings; mean/std are the class defaults).
QWEN2_5_VL_IMAGE_SETTINGS = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor, for installs without torchvision (module docstring)."""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
        if video_processor is not None:
            raise ValueError("ImageOnlyQwen2_5_VLProcessor has no video processor; use Qwen2_5_VLProcessor")
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None

    @classmethod
    def get_attributes(cls) -> list[str]:
        # The sub-processors built, checked, saved and loaded: all of Qwen2.5-VL's but the video processor.
        return [name for name in super().get_attributes() if name != "video_processor"]

    def to_dict(self) -> dict:
        # Saved as the real class, so that a directory written here loads as an ordinary Qwen2.5-VL processor.
        return {**super().to_dict(), "processor_class": "Qwen2_5_VLProcessor"}


def _image_processor(**settings):
    if has_torchvision():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**settings)
    # transformers falls back to this one itself without torchvision (with a warning); named to stay quiet.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**settings)


def make_tiny_vlm_processor(tokenizer, **image_settings) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor around `tokenizer` (the vision tokens added when missing: the tokenizer is modified)
    with Qwen2.5-VL-Instruct's chat template and image settings (`image_settings` override them, e.g. max_pixels)."""
    missing = [token for token in VISION_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    image_processor = _image_processor(**{**QWEN2_5_VL_IMAGE_SETTINGS, **image_settings})
    if has_torchvision():
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(**{k: v for k, v in QWEN2_5_VL_IMAGE_SETTINGS.items()
                                                    if k not in ("min_pixels", "max_pixels")})  # fmt: skip
        return Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, None, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def load_processor(model_dir: str | Path):
    """The HF processor saved in `model_dir`, or None when it has none (a text-only model: no image processor)."""
    model_dir = Path(model_dir)
    configs = [model_dir / name for name in ("processor_config.json", "preprocessor_config.json")]
    found = [json.loads(path.read_text()) for path in configs if path.is_file()]
    # transformers 5 nests the image processor in processor_config.json; older saves write preprocessor_config.json
    if not any("image_processor" in config or "image_processor_type" in config for config in found):
        return None
    from transformers import AutoProcessor

    if has_torchvision() or any(config.get("processor_class") != "Qwen2_5_VLProcessor" for config in found):
        return AutoProcessor.from_pretrained(model_dir)
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(model_dir)
