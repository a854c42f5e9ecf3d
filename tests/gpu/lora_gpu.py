"""GPU LoRA check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/lora_gpu.py [--out DIR]
    python tests/gpu/lora_gpu.py --smoke      # CPU: checks the script, measures nothing

A PEFT adapter with non-zero weights on every linear of a tiny Llama is taken in by the engine
(`lora.adapter`) and run on the GPU in fp32 with TF32 off: its logits must equal HF + PEFT's on the
same GPU (<= 1e-4) under the local spec and, when Transformer Engine is installed, under the TE spec,
whose layer-norm-fused linear_qkv / linear_fc1 make the adapter normalise its own input
(megatron_swift/tuners/lora/layers.py). Without TE the TE row is skipped and the output says so.
Writes gpu_lora.json to --out.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests/gpu/common.py

from megatron_swift._optional import has_transformer_engine
from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import build_model_chunks, transformer_config, translate
from megatron_swift.models.forward import forward_logits
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.tuners.lora import LoraConfig
from tests.gpu.common import NOT_CARRIED, device_for, environment, parser, write_result

RANK, ALPHA, TOLERANCE = 4, 8.0, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def hf_logits(hf_dir: Path, adapter_dir: Path, tokens: torch.Tensor, device: torch.device):
    """Makes the adapter (random, non-zero lora_B); returns HF's logits without it and HF + PEFT's with it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    base = base.to(device).eval()
    without = base(tokens.to(device)).logits.float().cpu()
    config = PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(adapter_dir)
    return without, model(tokens.to(device)).logits.float().cpu()


def engine_logits(hf_dir: Path, adapter_dir: Path, spec: str, tokens: torch.Tensor, device: torch.device):
    from megatron_swift.checkpoint.engine import load_hf_into_chunks
    from megatron_swift.checkpoint.hf import HFCheckpoint
    from megatron_swift.checkpoint.peft import apply_lora_with_adapter

    checkpoint = HFCheckpoint(hf_dir)
    args = translate(checkpoint.config)
    init_distributed(ParallelConfig())
    try:
        chunks = build_model_chunks(args, transformer_config(args, ParallelConfig()), spec=spec)
        chunks = [chunk.to(device) for chunk in chunks]
        load_hf_into_chunks(chunks, checkpoint, args)
        lora = LoraConfig(rank=RANK, alpha=ALPHA, adapter=str(adapter_dir))
        apply_lora_with_adapter(chunks, lora, args, hf_dir, seed=0)
        return forward_logits(chunks, tokens.to(device), args.vocab_size)
    finally:
        destroy_distributed()


def main() -> None:
    args = parser(__doc__).parse_args()
    device = device_for("tests/gpu/lora_gpu.py", args.smoke)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    specs = ["local", "te"] if has_transformer_engine() else ["local"]
    result = {**environment(device), "tolerance": TOLERANCE}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model("llama", Path(tmp) / "llama")
        tokens = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
        base, reference = hf_logits(hf_dir, Path(tmp) / "adapter", tokens, device)
        # The adapter must move the logits, or equal logits would prove nothing.
        result["adapter_effect_max_abs"] = float((reference - base).abs().max())
        for spec in specs:
            diff = (engine_logits(hf_dir, Path(tmp) / "adapter", spec, tokens, device) - reference).abs().max()
            result[f"max_abs_diff_{spec}_spec_vs_peft"] = float(diff)
    if "te" not in specs:
        result["te_spec"] = f"skipped, transformer-engine {NOT_CARRIED}"
    failed = [key for key, value in result.items() if key.startswith("max_abs_diff") and value > TOLERANCE]
    if result["adapter_effect_max_abs"] <= 100 * TOLERANCE:
        failed.append("adapter_effect_max_abs (the adapter barely changes the logits)")
    result["ok"] = not failed
    write_result(args.out, "gpu_lora.json", result)
    print(result)
    if failed:
        raise SystemExit(f"LoRA logits differ from HF + PEFT beyond {TOLERANCE}: {failed}")


if __name__ == "__main__":
    main()
