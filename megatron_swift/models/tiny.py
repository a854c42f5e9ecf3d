"""Tiny random HF models and a tiny trained tokenizer, for tests and examples (no hub access).

The tokenizer is a byte-level BPE trained in-process on a small embedded corpus, with ChatML
special tokens and chat template. Models are the family's `tiny_config`, randomly initialised
with every parameter and saved buffer perturbed (norm weights and routing biases too), so a
mapping that swaps or drops a tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_swift.models.family import Family, all_families

CORPUS = """\
Megatron-Core splits a transformer over many devices: tensor parallelism cuts each weight matrix,
pipeline parallelism cuts the stack of layers, and data parallelism copies the model. Sequence
parallelism shards activations along the sequence, context parallelism splits long inputs, and
expert parallelism places the experts of a mixture-of-experts layer on different ranks.
A tokenizer turns text into numbers. The quick brown fox jumps over the lazy dog. Numbers such as
0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in many documents, and so do questions and answers.
User: What is the capital of France? Assistant: The capital of France is Paris.
User: Call the weather tool for Berlin. Assistant: {"name": "get_weather", "arguments": {"city": "Berlin"}}
Fine-tuning adapts a pretrained model to a task with a small learning rate and a few thousand steps.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int = 384, corpus: str | None = None, extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer (`PreTrainedTokenizerFast`) trained on CORPUS (or on `corpus`, e.g. a task's
    training text, so its frequent words become single tokens); `extra_special_tokens` (e.g. a vision model's
    placeholders) get the ids after the trained vocabulary, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((CORPUS if corpus is None else corpus).splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
    )
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return fast


def tiny_hf_config(family: Family, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family.model_type, architectures=[family.architectures[0]], **{**family.tiny_config, **overrides}
    )


@torch.no_grad()
def make_tiny_model(
    family_name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_corpus: str | None = None,
    tokenizer_vocab_size: int = 384,
    **config_overrides,
) -> Path:
    """Write a random tiny HF model of `family_name` + tokenizer to `out_dir`; returns the path. The tokenizer is
    trained on `tokenizer_corpus` when given (then `vocab_size` must hold `tokenizer_vocab_size` tokens)."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    known = all_families()
    if family_name not in known:
        raise ValueError(f"unknown family {family_name!r}; known: {', '.join(sorted(known))}")
    family = known[family_name]
    tower = family.vision
    special = tuple(token for _, token in tower.special_tokens) if tower else ()
    tokenizer = make_tiny_tokenizer(tokenizer_vocab_size, tokenizer_corpus, special)
    token_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if tower is not None:  # the decoder's token ids live in the text sub-config, the placeholders' at the top
        text = {**family.tiny_config[tower.text_config_field], **config_overrides.pop(tower.text_config_field, {})}
        config_overrides[tower.text_config_field] = {**text, **token_ids}
        token_ids.update({field: tokenizer.convert_tokens_to_ids(token) for field, token in tower.special_tokens})
    config = tiny_hf_config(family, **token_ids, **config_overrides)
    vocab_size = config.get_text_config().vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    if tower is not None:  # not a causal-LM auto class: the architecture's own class
        model = getattr(transformers, family.architectures[0])._from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    persistent_buffers = [
        (f"{module_name}.{name}", buffer)
        for module_name, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set and buffer.is_floating_point()
    ]  # saved with the weights, e.g. DeepSeek's e_score_correction_bias (zero at initialisation)
    for name, param in [*model.named_parameters(), *persistent_buffers]:
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1 and ("norm" in name or ".ln_" in name):  # ln_q: Qwen-VL's patch merger norm
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.05 * noise)
    model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tower is not None:  # the processor the data path encodes image rows with (data/multimodal.py)
        tiny_vlm_processor(tokenizer, config).save_pretrained(out)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    ).save_pretrained(out)
    return out


def tiny_vlm_processor(tokenizer, config):
    """The Qwen2.5-VL processor of a tiny vision-language model: the image processor's patch, merge and temporal
    sizes are the tiny tower's (not the real model's 14-pixel patches), and images are resized to between 1 and 64
    merged patches of (patch x merge)^2 pixels: at most 64 placeholder tokens an image, so tests and the example stay
    fast."""
    from megatron_swift.models.tiny_processor import make_tiny_vlm_processor

    vision = config.vision_config
    merged_patch = vision.patch_size * vision.spatial_merge_size
    return make_tiny_vlm_processor(
        tokenizer,
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=merged_patch**2,
        max_pixels=64 * merged_patch**2,
    )
