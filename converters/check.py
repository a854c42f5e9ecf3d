"""`check`: run the HF model and the converted megatron-core model on the same tokens, compare logits.

The HF implementation is the reference. Both sides run in fp32; the megatron side runs at the
requested TP/PP layout (loading the checkpoint resharded), through the same pipeline schedule as
training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from converters.convert import build_chunks, conversion_world_size, model_args_for_checkpoint
from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed, run_workers
from megatron_swift.models.forward import forward_logits
from megatron_swift.models.layout import model_layout_problems


def logits_in_this_world(mcore_dir: str | Path, parallel: ParallelConfig, tokens: torch.Tensor):
    """Initialise `parallel` in the running world, load the checkpoint, return its fp32 logits on the
    one rank that reports them (last pipeline stage, TP and DP rank 0), None on the others."""
    from megatron.core import parallel_state as ps

    init_distributed(parallel)
    _, args = model_args_for_checkpoint(mcore_dir)
    chunks = build_chunks(args, parallel, torch.float32)
    load_model(chunks, full_model_weights_dir(Path(mcore_dir)))
    logits = forward_logits(chunks, tokens, args.vocab_size)
    reporting = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return logits if reporting else None


def _mcore_logits_worker(mcore_dir: str, parallel: dict, tokens: torch.Tensor):
    try:
        return logits_in_this_world(mcore_dir, ParallelConfig(**parallel), tokens)
    finally:
        destroy_distributed()


def mcore_logits(mcore_dir: str | Path, tokens: torch.Tensor, parallel: ParallelConfig | None = None):
    """fp32 logits [batch, seq, vocab] of a megatron-swift checkpoint loaded at `parallel`'s layout."""
    parallel = parallel or ParallelConfig()
    _, args = model_args_for_checkpoint(mcore_dir)
    problems = model_layout_problems(args, parallel)
    if problems:
        raise ConfigError("the model cannot be split this way:\n  " + "\n  ".join(problems))
    results = run_workers(
        _mcore_logits_worker, conversion_world_size(parallel), str(mcore_dir), dataclasses.asdict(parallel), tokens
    )
    return next(r for r in results if r is not None)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()(tokens).logits.float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    diff = (reference - candidate).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
    }


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def check(
    hf_dir, mcore_dir, parallel: ParallelConfig | None = None, batch: int = 2, seq: int = 32, seed: int = 0
) -> dict:
    _, args = model_args_for_checkpoint(mcore_dir)
    if args.sliding_window and seq > args.sliding_window:
        raise ConfigError(f"--seq {seq} exceeds the model's sliding_window {args.sliding_window}")
    tokens = sample_tokens(args.vocab_size, batch, seq, seed)
    return compare_logits(hf_logits(hf_dir, tokens), mcore_logits(mcore_dir, tokens, parallel))
