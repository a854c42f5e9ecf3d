"""A quick HF-side fine-tune of a tiny model, so tests have a 'tuned' model that differs from its base
in a meaningful direction (lower loss on the sample chats) without running the training engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SFT_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "sft_sample.jsonl"


def _sft_batch(base_dir: Path) -> dict:
    """The sample chats as one padded batch (assistant-only loss mask), tokenized by the model's tokenizer."""
    from transformers import AutoTokenizer

    from megatron_swift.data.packing import PaddedCollate
    from megatron_swift.eval.perplexity import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return PaddedCollate(64, tokenizer.pad_token_id)(encode_rows(SFT_DATA, tokenizer, 64, "sft"))


def _train(model, batch: dict, steps: int, lr: float) -> None:
    """Full-batch Adam on the model's trainable parameters with the masked mean token loss."""
    mask = batch["loss_mask"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        logits = model(input_ids=batch["tokens"]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fine_tune(base_dir: Path, out_dir: Path, steps: int = 12, lr: float = 1e-2) -> Path:
    """Full-batch Adam on the sample chats with the assistant-only loss; saves an HF directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    batch = _sft_batch(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _train(model, batch, steps, lr)
    model.save_pretrained(out_dir)
    for item in base_dir.iterdir():  # tokenizer, chat template, generation config
        if item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


# PEFT's names of the llama family's linears; lora_A is shared within megatron-core's fused linears (q/k/v, gate/up).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_A = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _grouped_linears(model):
    """(owner module, first linear's name, another linear's name) of each fused group in each layer."""
    for layer in model.base_model.model.model.layers:
        for group in SHARED_A:
            owner = layer.self_attn if group[0] == "q_proj" else layer.mlp
            for name in group[1:]:
                yield owner, group[0], name


def fine_tune_lora(base_dir: Path, out_dir: Path, steps: int = 6, lr: float = 1e-2, rank: int = 4,
                   alpha: float = 8.0) -> Path:  # fmt: skip
    """`fine_tune`'s loop on a PEFT LoRA adapter (every linear; lora_B starts at zero as PEFT's) whose lora_A is one
    shared module within each fused group, as megatron-core's fused linears hold one A (so the adapter is taken in at
    rank `rank`, and its gradients compare one to one); saves a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    batch = _sft_batch(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0))
    for owner, first, name in _grouped_linears(model):
        getattr(owner, name).lora_A["default"] = getattr(owner, first).lora_A["default"]
    _train(model, batch, steps, lr)
    for owner, _, name in _grouped_linears(model):  # untied copies: each module's tensors of its own on disk
        getattr(owner, name).lora_A["default"] = copy.deepcopy(getattr(owner, name).lora_A["default"])
    model.save_pretrained(out_dir)
    return out_dir
