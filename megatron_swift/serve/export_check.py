"""Static check that an HF directory has what vLLM's loader needs, without vLLM or a GPU.

vLLM reads `config.json` (picks the model class from `architectures`, sizes from the text config,
`max_position_embeddings` for the default `--max-model-len`), loads the tokenizer with transformers
(so it needs the tokenizer files, and a chat template for the OpenAI chat endpoint), takes default
sampling settings and stop tokens from `generation_config.json`, and maps the safetensors tensor
names of the HF architecture. The name check compares the stored names with the names transformers
itself would save for the same architecture, built on the meta device (no memory, no weights read).
LoRA adapters need a PEFT `adapter_config.json` and adapter weights, and no `modules_to_save` or DoRA
(vLLM's adapter loader refuses both).

A vision-language model (a `vision_config` in config.json, e.g. Qwen2.5-VL) also needs its processor's settings
(`processor_config.json` or `preprocessor_config.json` holding the image processor: vLLM builds the image inputs
and placeholder counts with them), and its names are those of the image-text-to-text class, vision tower
(`visual.*`) included, in either of the layouts its family reads (the hub's `model.layers.*` / `visual.*`,
which the export writes, or transformers' module names `model.language_model.*` / `model.visual.*`).
"""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_CONFIG_FIELDS = ("architectures", "model_type")
# In the text config: the top level, or `text_config` of a multimodal config.
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings")
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _weight_names(model_dir: Path, problems: list[str]) -> set[str] | None:
    from safetensors import safe_open

    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            problems.append(f"{index}: not a safetensors index ({exc})")
            return None
    else:
        files = [p.name for p in model_dir.glob("*.safetensors")]
    if not files:
        problems.append(f"{model_dir}: no safetensors weights (vLLM loads *.safetensors; re-save or re-export)")
        return None
    names: set[str] = set()
    for name in files:
        if not (model_dir / name).is_file():
            problems.append(f"{model_dir / name}: listed in the index but missing")
            continue
        with safe_open(str(model_dir / name), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _expected_names(config) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of the architecture as HF checkpoints store them.

    transformers 5 fuses some weights in memory (MoE experts) and splits them again on save, so the
    stored names are the state dict passed through its save-side conversion; a tied output layer is
    optional. A vision-language model is built as its image-text-to-text class (tower included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_class = AutoModelForImageTextToText if _is_vision_language(config) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config)
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers without weight conversions store the state dict as is
        names = set(state)
    else:
        names = set(revert_weight_conversion(model, state))
    optional = {n for n in names if n.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    return names - optional, optional


def _check_names(model_dir: Path, config, problems: list[str]) -> None:
    stored = _weight_names(model_dir, problems)
    if stored is None:
        return
    if getattr(config, "quantization_config", None):  # quantizers store their own tensor layouts
        return
    required, optional = _closest_layout(config, stored, *_expected_names(config))
    for label, names in (("missing", required - stored), ("unexpected", stored - required - optional)):
        if names:
            shown = ", ".join(sorted(names)[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            problems.append(f"{model_dir}: {len(names)} {label} tensor name(s) for {config.architectures[0]}: {shown}")


def _closest_layout(config, stored: set[str], required: set[str], optional: set[str]) -> tuple[set[str], set[str]]:
    """(required, optional) in the layout nearest the stored names among those the family reads: transformers' save
    names, and the same renamed either way by the family's `hf_aliases` (pairs of prefixes naming one tensor in two
    layouts, e.g. Qwen2.5-VL's `model.language_model.` / `model.` and `model.visual.` / `visual.`)."""
    from megatron_swift.models.family import UnsupportedModelError, family_for
    from megatron_swift.models.mapping import renamed_prefix

    try:
        aliases = family_for(config).mapping.hf_aliases
    except UnsupportedModelError:
        return required, optional

    def renamed(names: set[str], pairs) -> set[str]:
        return {renamed_prefix(name, pairs) for name in names}

    layouts = [(required, optional)]
    for pairs in (aliases, tuple((b, a) for a, b in aliases)):
        if pairs:
            layouts.append((renamed(required, pairs), renamed(optional, pairs)))
    return min(layouts, key=lambda layout: len(layout[0] - stored) + len(stored - layout[0] - layout[1]))


def _check_processor(model_dir: Path, problems: list[str]) -> None:
    found = []
    for name in PROCESSOR_FILES:
        if (model_dir / name).is_file():
            try:
                found.append(json.loads((model_dir / name).read_text()))
            except json.JSONDecodeError as exc:
                problems.append(f"{model_dir / name}: invalid JSON at line {exc.lineno} ({exc.msg})")
                return
    if not any("image_processor" in entry or "image_processor_type" in entry for entry in found):
        problems.append(
            f"{model_dir}: a vision-language model (vision_config in config.json) without its image processor "
            f"settings ({' or '.join(PROCESSOR_FILES)} with the image processor); vLLM builds the image inputs "
            "with them: copy them from the base model's directory (mcore-to-hf copies them from the checkpoint's "
            "HF directory, so re-export a run started from a directory that has them)"
        )


def check_export(model_dir: str | Path) -> list[str]:
    """Everything vLLM would miss in `model_dir`, one line each; an empty list means ready to serve."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return [f"{model_dir}: no config.json (not an HF model directory)"]
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        return [f"{config_file}: invalid JSON at line {exc.lineno} ({exc.msg})"]
    problems = [f"{config_file}: missing field {f!r}" for f in REQUIRED_CONFIG_FIELDS if not raw.get(f)]
    text = raw.get("text_config", raw)  # multimodal configs keep the sizes in text_config
    where = "text_config." if text is not raw else ""
    problems += [f"{config_file}: missing field {where + f!r}" for f in SIZE_FIELDS if not text.get(f)]
    if not any(all((model_dir / name).is_file() for name in group) for group in TOKENIZER_FILES):
        options = " or ".join("+".join(group) for group in TOKENIZER_FILES)
        problems.append(f"{model_dir}: no tokenizer files ({options})")
    if not (model_dir / "tokenizer_config.json").is_file():
        problems.append(f"{model_dir}: no tokenizer_config.json")
    elif not (model_dir / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
        (model_dir / "tokenizer_config.json").read_text()
    ):
        problems.append(f"{model_dir}: no chat template (chat_template.jinja); /v1/chat/completions would refuse")
    if not (model_dir / "generation_config.json").is_file():
        problems.append(
            f"{model_dir}: no generation_config.json (vLLM's default stop tokens and sampling come from it)"
        )
    if raw.get("vision_config"):
        _check_processor(model_dir, problems)
    if problems:
        return problems
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as exc:
        return [f"{config_file}: transformers cannot read it ({exc})"]
    _check_names(model_dir, config, problems)
    return problems


def check_adapter(adapter_dir: str | Path) -> tuple[list[str], int | None]:
    """(problems, LoRA rank) of a PEFT adapter directory as vLLM's `--lora-modules` loads it."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return [f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)"], None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        return [f"{config_file}: invalid JSON at line {exc.lineno} ({exc.msg})"], None
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{config_file}: peft_type {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"{config_file}: 'r' must be a positive integer")
        rank = None
    # vLLM's PEFT loader refuses these (PEFTHelper._validate_features).
    if config.get("modules_to_save"):
        problems.append(
            f"{config_file}: modules_to_save {config['modules_to_save']} (vLLM serves LoRA weights only); "
            "export the run with --merge-lora and serve the merged model"
        )
    if config.get("use_dora"):
        problems.append(f"{config_file}: DoRA adapters are not supported by vLLM; merge it into the model")
    if not any((adapter_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        problems.append(f"{adapter_dir}: no adapter_model.safetensors")
    return problems, rank
