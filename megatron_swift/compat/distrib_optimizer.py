"""megatron-core's `fully_reshardable` distributed-optimizer checkpoints with more than one bucket per buffer.

Why: `DistributedOptimizer.sharded_param_state_fully_reshardable` (0.16 to 0.19) cuts each parameter's Adam
state out of its buffer's gathered state by the parameter's range in `param_index_map`, which counts the padding
at the end of every bucket, while the gathered state (`get_parameter_state_dp_zero`) has that padding removed.
With more than one bucket (a model past megatron's bucket size, 40M elements, or a small `ddp_bucket_size`),
every parameter after the first bucket was saved with its neighbours' state (a resumed tiny run with 20k-element
buckets: loss 6.00 instead of 5.11), and loading warned of zero-padded ranges. Upstream fixed it
after 0.19 (NVIDIA/Megatron-LM 32a03b7, "Fix bugs in re-sharding DistributedOptimizer state") by shifting the
ranges inside that function. `compact_param_index_maps` shifts them from outside, around the call, only while
megatron's own code still slices by the padded ranges (its source holds `PADDED_SLICE`). Nothing is replaced:
the buffers' `param_index_map` dicts are swapped for the call and put back. `FULLY_RESHARDABLE_SYMBOLS` lists
what this reads; tests/test_compat.py checks they still exist and that the source holds the slice or the fix.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools

FULLY_RESHARDABLE_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_param_state_fully_reshardable"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer"),
)
# How megatron slices the gathered state while the bug is there; upstream's fix names `padding_adjustment`.
PADDED_SLICE = "world_tensors[state_key][param_world_start:param_world_end]"
UPSTREAM_FIX = "padding_adjustment"


@functools.cache
def slices_padded_ranges() -> bool:
    """Whether this megatron-core still cuts the gathered state by the padded ranges."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return PADDED_SLICE in inspect.getsource(DistributedOptimizer.sharded_param_state_fully_reshardable)


@contextlib.contextmanager
def compact_param_index_maps(optimizers):
    """While the body runs, the buffers of these DistributedOptimizers map each parameter to its range without the
    end padding of the buckets before it (the ranges of the gathered state). A no-op where upstream is fixed."""
    buffers = [buffer for optimizer in optimizers for buffer in optimizer.buffers] if slices_padded_ranges() else []
    originals = [buffer.param_index_map for buffer in buffers]
    for buffer in buffers:
        padding = (bucket.grad_data.numel() - bucket.numel_unpadded for bucket in buffer.buckets[:-1])
        stripped = list(itertools.accumulate(padding, initial=0))  # padding removed before each bucket
        buffer.param_index_map = {
            param: (start - stripped[bucket], end - stripped[bucket], bucket)
            for param, (start, end, bucket) in buffer.param_index_map.items()
        }
    try:
        yield
    finally:
        for buffer, index_map in zip(buffers, originals, strict=True):
            buffer.param_index_map = index_map
