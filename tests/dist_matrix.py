"""Worker for distributed tests: many (checkpoint, layout) cases inside ONE multi-process launch.

Process start-up and imports cost ~10 s per launch on 2 cores, so each world size is launched
once and every layout for it runs inside, re-initialising megatron-core's parallel state between
cases (the gloo process group is kept).
"""

from __future__ import annotations

from pathlib import Path

import torch

from converters.convert import build_chunks, model_args_for_checkpoint
from converters.mcore_io import load_model, model_weights_dir
from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models.forward import forward_logits


def logits_for_cases(cases: list[tuple[str, dict]], tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """case index -> fp32 logits, returned by the rank holding them (last stage, TP/DP rank 0)."""
    from megatron.core import parallel_state as ps

    found = {}
    try:
        for index, (ckpt_dir, parallel) in enumerate(cases):
            parallel_cfg = ParallelConfig(**parallel)
            init_distributed(parallel_cfg)
            _, args = model_args_for_checkpoint(ckpt_dir)
            chunks = build_chunks(args, parallel_cfg, torch.float32)
            load_model(chunks, model_weights_dir(Path(ckpt_dir)))
            logits = forward_logits(chunks, tokens, args.vocab_size)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                found[index] = logits
    finally:
        destroy_distributed()
    return found


def run_cases(cases: list[tuple[Path, dict]], tokens: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    from megatron_swift.distributed import run_workers

    merged: dict[int, torch.Tensor] = {}
    for result in run_workers(logits_for_cases, world_size, [(str(c), p) for c, p in cases], tokens):
        merged.update(result)
    return [merged[i] for i in range(len(cases))]
