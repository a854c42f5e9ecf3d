"""Worker for distributed tests: many (checkpoint, layout) cases inside ONE multi-process launch.

Process start-up and imports cost ~10 s per launch on 2 cores, so each world size is launched
once and every layout for it runs inside, re-initialising megatron-core's parallel state between
cases (the gloo process group is kept).
"""

from __future__ import annotations

import torch

from converters.check import logits_in_this_world
from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed


def logits_for_cases(cases: list[tuple], tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """case index -> fp32 logits, returned by the rank holding them (last stage, TP/DP rank 0). A case is (checkpoint,
    layout) on `tokens`, or (checkpoint, layout, batch) on its own batch (e.g. converters.check.sample_vision_batch)."""
    found = {}
    try:
        for index, (ckpt_dir, parallel, *batch) in enumerate(cases):
            logits = logits_in_this_world(ckpt_dir, ParallelConfig(**parallel), batch[0] if batch else tokens)
            if logits is not None:
                found[index] = logits
    finally:
        destroy_distributed()
    return found


def run_case_matrix(worker, case_count: int, world_size: int, *args) -> list:
    """Run `worker(*args)` (which returns {case index: result} from the reporting ranks) on
    `world_size` processes; the results in case order."""
    from megatron_swift.distributed import run_workers

    merged: dict = {}
    for result in run_workers(worker, world_size, *args):
        merged.update(result)
    return [merged[i] for i in range(case_count)]


def run_cases(cases: list[tuple], tokens: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Logits of each (checkpoint, layout) or (checkpoint, layout, batch) case, in one launch of `world_size` ranks."""
    cases = [(str(ckpt), parallel, *batch) for ckpt, parallel, *batch in cases]
    return run_case_matrix(logits_for_cases, len(cases), world_size, cases, tokens)
