"""Layouts that fit a cluster, fastest first: enumerate, keep what preflight accepts and what fits, rank.

Enumerated: TP (divisors of the GPUs per node: TP never crosses a node), CP, PP (with an uneven first /
last stage when the layers do not divide), VPP, EP and expert TP (1 or TP) for MoE models, micro-batch
size; sequence parallelism with TP > 1; the distributed optimizer whenever there is data parallelism
(it moves the same bytes as the all-reduce and only saves memory, so layouts without it are dominated);
recomputation none -> selective -> full (uniform, one layer): for each layout the lightest that fits, as
recomputing never makes a step faster. Every candidate is checked by `preflight` (only problems the job
as written does not already have count) and by megatron-core's interleaved-schedule rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_swift.config import ParallelConfig
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.plan.estimate import Estimate, estimate
from megatron_swift.plan.hardware import Cluster
from megatron_swift.plan.layout import Target
from megatron_swift.training.config import JobConfig, preflight

RECOMPUTE = (
    {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None},
    {"recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
)


TRAIN_FIELDS = (
    "micro_batch_size",
    "use_distributed_optimizer",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
)


@dataclass
class Candidate:
    job: JobConfig
    estimate: Estimate
    written: JobConfig  # the job as written

    def overrides(self) -> list[str]:
        """The launcher's --section.field value pairs that turn the job as written into this layout."""
        names = [("parallel", f.name) for f in dataclasses.fields(ParallelConfig)]
        out = []
        for section, name in names + [("train", name) for name in TRAIN_FIELDS]:
            value = getattr(getattr(self.job, section), name)
            if value != getattr(getattr(self.written, section), name):
                text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
                out += [f"--{section}.{name}", text]
        return out


def schedule_problems(job: JobConfig, world: int) -> list[str]:
    """megatron-core's interleaved schedule runs micro-batches in groups of PP: it needs M >= PP and M % PP == 0."""
    p, t = job.parallel, job.train
    if not p.virtual_pipeline_model_parallel_size or p.virtual_pipeline_model_parallel_size < 2:
        return []
    dp = world // p.model_parallel_size
    m, pp = t.global_batch_size // max(t.micro_batch_size * dp, 1), p.pipeline_model_parallel_size
    if m < pp or m % pp:
        return [
            f"train.global_batch_size: the interleaved schedule needs micro-batches per step ({m}) to be a "
            f"multiple of pipeline_model_parallel_size ({pp})"
        ]
    return []


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipeline_splits(layers: int, pp: int) -> list[tuple[int | None, int | None]]:
    """Even split, or megatron's uneven one: middle stages ceil(L / PP), the rest shared by the first and last."""
    if layers % pp == 0:
        return [(None, None)]
    if pp < 3:
        return []
    middle = -(-layers // pp)
    rest = layers - middle * (pp - 2)
    first = rest // 2
    return [(first, rest - first)] if first >= 1 and rest - first >= 1 else []


def parallel_layouts(args: GPTModelArgs, world: int, gpus_per_node: int, seq_length: int):
    """Every ParallelConfig worth estimating (pure arithmetic; preflight has the last word)."""
    t = args.transformer
    layers, experts = t["num_layers"], t.get("num_moe_experts") or 0
    for tp in _divisors(min(gpus_per_node, world)):
        for cp in (c for c in (1, 2, 4, 8) if world % (tp * c) == 0 and seq_length % (2 * c) == 0):
            for pp in (p for p in _divisors(world // (tp * cp)) if p <= layers):
                for first, last in _pipeline_splits(layers, pp):
                    per_stage = layers // pp if first is None else -(-layers // pp)
                    vpps = [None] + [
                        v
                        for v in (2, 3, 4, 6, 8)
                        if pp > 1 and per_stage % v == 0 and (first is None or (first % v == 0 and last % v == 0))
                    ]
                    for vpp in vpps:
                        for ep in _divisors(experts) if experts else [1]:
                            for etp in sorted({1, tp}) if experts else [None]:
                                if (world // pp) % (ep * (etp or tp)):
                                    continue
                                yield ParallelConfig(
                                    tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp,
                                    virtual_pipeline_model_parallel_size=vpp,
                                    context_parallel_size=cp,
                                    expert_model_parallel_size=ep,
                                    expert_tensor_parallel_size=etp,
                                    sequence_parallel=tp > 1,
                                    decoder_first_pipeline_num_layers=first,
                                    decoder_last_pipeline_num_layers=last,
                                )


def search(
    job: JobConfig,
    args: GPTModelArgs,
    cluster: Cluster,
    *,
    target: Target | None = None,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
) -> tuple[list[Candidate], int]:
    """(layouts that fit, fastest first; how many layouts preflight accepted)."""
    world = cluster.world_size
    baseline = set(preflight(job, world, args))  # problems of the job as written stay the user's business
    fitting, accepted, cache = [], 0, {}
    for parallel in parallel_layouts(args, world, cluster.gpus_per_node, job.data.seq_length):
        dp = world // parallel.model_parallel_size
        for mbs in micro_batch_sizes:
            if job.train.global_batch_size % (mbs * dp):
                continue
            train = dataclasses.replace(
                job.train, micro_batch_size=mbs, use_distributed_optimizer=dp * parallel.context_parallel_size > 1
            )
            for recompute in RECOMPUTE:
                candidate = dataclasses.replace(job, parallel=parallel, train=dataclasses.replace(train, **recompute))
                if set(preflight(candidate, world, args)) - baseline or schedule_problems(candidate, world):
                    break  # recomputation does not change what preflight says: no lighter or heavier one passes
                accepted += recompute["recompute_granularity"] is None
                result = estimate(candidate, world, args, cluster, target, static_cache=cache)
                if result.fits():
                    fitting.append(Candidate(candidate, result, job))
                    break  # heavier recomputation only costs time
    fitting.sort(key=lambda c: (c.estimate.time.step_s, c.estimate.peak_bytes))
    return fitting, accepted
