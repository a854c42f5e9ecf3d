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
