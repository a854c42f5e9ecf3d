"""What a vision-language model trains: ms-swift's `freeze_vit` / `freeze_aligner` / `freeze_llm` and
`vit_lr` / `aligner_lr` (the `train` section).

Parameters are classed by name. The vision tower's (`<VisionTower.module_name>.*`, models/vlm.py) belong to the ViT,
except those under its aligner modules (Qwen2.5-VL's patch merger, `VisionTower.aligner_modules`), which belong to
the aligner; everything else is the language model's. Freezing clears `requires_grad` before DDP is built, so a
frozen parameter gets no gradient buffer and no optimizer state, and the optimizer never touches it. A learning rate
of its own is a megatron-core optimizer param-group override: the group's max_lr is the part's rate and its min_lr
is train.min_lr scaled by the same ratio, so every group follows the one schedule's shape (warmup, decay) at its own
height.
"""

from __future__ import annotations

from megatron_swift.models.family import VisionTower

PARTS = ("vit", "aligner", "llm")


def part_of(name: str, tower: VisionTower) -> str:
    """'vit', 'aligner' or 'llm' for a parameter name of a model chunk (DDP / Float16Module prefixes allowed)."""
    parts = name.split(".")
    if tower.module_name not in parts:
        return "llm"
    below = parts[parts.index(tower.module_name) + 1 :]
    return "aligner" if below and below[0] in tower.aligner_modules else "vit"


def frozen_parts(train) -> tuple[str, ...]:
    """The parts `train` (a TrainSection) freezes."""
    flags = {"vit": train.freeze_vit, "aligner": train.freeze_aligner, "llm": train.freeze_llm}
    return tuple(part for part in PARTS if flags[part])


def freeze(chunks, tower: VisionTower, train) -> None:
    """Clear `requires_grad` of the frozen parts' parameters (before DDP wraps the chunks)."""
    frozen = frozen_parts(train)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if part_of(name, tower) in frozen:
                param.requires_grad_(False)


def lr_overrides(tower: VisionTower, train, optimizer_config) -> dict | None:
    """megatron-core optimizer `config_overrides` giving the ViT and the aligner their own learning rate; None when
    neither is set (megatron-core's default groups). The standard overrides (no weight decay on biases and 1-D
    parameters) are kept: passing any override replaces them."""
    rates = {"vit": train.vit_lr, "aligner": train.aligner_lr}
    if all(rate is None for rate in rates.values()):
        return None
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    overrides = get_standard_config_overrides(optimizer_config)
    for part, rate in rates.items():
        if rate is None:
            continue
        in_part = ParamWithNamePredicate(f"mswift_{part}", lambda _, name, part=part: part_of(name, tower) == part)
        min_lr = train.min_lr * rate / train.lr if train.lr else 0.0
        overrides[ParamKey(with_name_predicate=in_part)] = {"max_lr": rate, "min_lr": min_lr}
    return overrides


def problems(train, tower: VisionTower | None) -> list[str]:
    """What is wrong with the vision-language fields of `train` for a model with (or without) a vision tower."""
    found = []
    if tower is None:
        for name in ("vit_lr", "aligner_lr"):
            if getattr(train, name) is not None:
                found.append(f"train.{name}: the model has no vision tower")
        if train.freeze_llm:
            found.append("train.freeze_llm: the model is a language model only; nothing would be trained")
        return found
    for part, name in (("vit", "vit_lr"), ("aligner", "aligner_lr")):
        rate = getattr(train, name)
        if rate is not None and rate <= 0:
            found.append(f"train.{name}={rate} must be > 0")
        elif rate is not None and getattr(train, f"freeze_{part}"):
            found.append(f"train.{name}={rate}: train.freeze_{part} is true, so the {part} is not trained")
    if train.train_type == "full" and len(frozen_parts(train)) == len(PARTS):
        found.append("train.freeze_vit, freeze_aligner and freeze_llm are all true: nothing would be trained")
    if train.train_type == "lora" and not (train.freeze_vit and train.freeze_aligner):
        found.append("train.freeze_vit / freeze_aligner false with train_type=lora: LoRA trains the language model's "
                     "adapters only here; keep both true, or train the tower with train_type=full")  # fmt: skip
    return found
