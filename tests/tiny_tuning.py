"""A quick HF-side fine-tune of a tiny model, so tests have a 'tuned' model that differs from its base
in a meaningful direction (lower loss on the sample chats) without running the training engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SFT_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "sft_sample.jsonl"


def fine_tune(base_dir: Path, out_dir: Path, steps: int = 12, lr: float = 1e-2) -> Path:
    """Full-batch Adam on the sample chats with the assistant-only loss; saves an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.data.packing import PaddedCollate
    from megatron_swift.eval.perplexity import encode_rows

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = PaddedCollate(64, tokenizer.pad_token_id)(encode_rows(SFT_DATA, tokenizer, 64, "sft"))
    mask = batch["loss_mask"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = model(input_ids=batch["tokens"]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    for item in base_dir.iterdir():  # tokenizer, chat template, generation config
        if item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


# PEFT's names of the llama family's linears; lora_A is shared within megatron-core's fused linears (q/k/v, gate/up).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_A = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fine_tune_lora(base_dir: Path, out_dir: Path, steps: int = 6, lr: float = 1e-2, rank: int = 4,
                   alpha: float = 8.0) -> Path:  # fmt: skip
    """`fine_tune`'s loop on a PEFT LoRA adapter (every linear; lora_B starts at zero as PEFT's) whose lora_A is one
    shared module within each fused group, as megatron-core's fused linears hold one A (so the adapter is taken in at
    rank `rank`, and its gradients compare one to one); saves a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.data.packing import PaddedCollate
    from megatron_swift.eval.perplexity import encode_rows

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = PaddedCollate(64, tokenizer.pad_token_id)(encode_rows(SFT_DATA, tokenizer, 64, "sft"))
    mask = batch["loss_mask"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0))
    for layer in model.base_model.model.model.layers:
        for group in SHARED_A:
            owner = layer.self_attn if group[0] == "q_proj" else layer.mlp
            for name in group[1:]:
                getattr(owner, name).lora_A["default"] = getattr(owner, group[0]).lora_A["default"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        logits = model(input_ids=batch["tokens"]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer in model.base_model.model.model.layers:  # untied copies: each module's tensors of its own on disk
        for group in SHARED_A:
            owner = layer.self_attn if group[0] == "q_proj" else layer.mlp
            for name in group[1:]:
                getattr(owner, name).lora_A["default"] = copy.deepcopy(getattr(owner, name).lora_A["default"])
    model.save_pretrained(out_dir)
    return out_dir
