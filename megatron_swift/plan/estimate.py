"""One job's estimate: per pipeline stage, the rank with the most memory, and the step time.

Static memory (params.py) is exact for what megatron-core allocates for the built model and optimizer;
activations (activations.py) and time (timing.py) are models with stated assumptions.
`activations_bytes` is everything a training step adds over the static part at its peak (kept
activations, the loss, transients); `total_bytes` = weights + grads + optimizer + activations.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, field

from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.plan.activations import ActivationModel
from megatron_swift.plan.hardware import Cluster
from megatron_swift.plan.layout import Layout, Ops, Target
from megatron_swift.plan.params import DENSE, EXPERT, Inventory, stage_static
from megatron_swift.plan.timing import StepTime, step_time
from megatron_swift.training.config import JobConfig
from megatron_swift.training.vision_tuning import frozen_parts


@dataclass
class RankEstimate:
    rank: int  # global rank (megatron's tp-cp-ep-dp-pp order)
    pp_stage: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    layers_bytes: int  # of activations: kept by the in-flight micro-batches
    logits_bytes: int  # of activations: the loss (last stage)
    temporary_bytes: int  # of activations: transients at the peak
    lora_bytes: int  # of weights: LoRA adapters
    in_flight: int  # micro-batches (model-chunk micro-batches) kept at once


@dataclass
class Estimate:
    layout: Layout
    ops: Ops
    ranks: list[RankEstimate]
    time: StepTime | None = None
    cluster: Cluster | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(r.total_bytes for r in self.ranks)

    def fits(self, usable_bytes: int | None = None) -> bool:
        limit = usable_bytes if usable_bytes is not None else self.cluster.usable_bytes if self.cluster else None
        return limit is None or self.peak_bytes <= limit

    def to_json(self) -> dict:
        lay = self.layout
        out = {
            "ranks": [asdict(r) for r in self.ranks],
            "step_time_s": round(self.time.step_s, 4) if self.time else None,
            "mfu": round(self.time.mfu, 4) if self.time else None,
            "peak_bytes": self.peak_bytes,
            "layout": {
                "world_size": lay.world,
                "tp": lay.tp,
                "pp": lay.pp,
                "vpp": lay.vpp,
                "cp": lay.cp,
                "ep": lay.ep,
                "etp": lay.etp,
                "dp": lay.dp,
                "sequence_parallel": lay.sp,
                "distributed_optimizer": lay.distributed_optimizer,
                "recompute": lay.recompute,
                "micro_batch_size": lay.micro_batch_size,
                "num_microbatches": lay.num_microbatches,
            },
            "notes": self.notes,
        }
        if self.cluster is not None:
            c = self.cluster
            out["device"] = {
                "name": c.device.name,
                "memory_bytes": c.memory_bytes,
                "usable_bytes": c.usable_bytes,
                "fits": self.fits(),
                "gpus_per_node": c.gpus_per_node,
                "nodes": c.nodes,
            }
            out["assumptions"] = {
                "compute_efficiency": c.compute_efficiency,
                "comm_efficiency": c.comm_efficiency,
                "reserve_gib": c.reserve_gib,
            }
        if self.time is not None:
            out["time"] = {k: round(v, 4) for k, v in asdict(self.time).items()}
        return out


def estimate(
    job: JobConfig,
    world_size: int,
    args: GPTModelArgs,
    cluster: Cluster | None = None,
    target: Target | None = None,
    *,
    with_time: bool = True,
    static_cache: dict | None = None,
) -> Estimate:
    """Per-stage memory (and, with a cluster, step time) of `job` on `world_size` ranks; the job must pass
    preflight. `target` (default: a GPU machine with the `.[gpu]` extra) decides kernels and fusions.
    `static_cache` (a dict kept by the caller) reuses the static part between jobs of the same layout."""
    target = target if target is not None else Target()
    lay = Layout.from_job(job, world_size, args)
    ops = Ops.resolve(job, target)
    inventory = Inventory(args, lay, ops, job.lora, frozen_parts(job.train))
    model = ActivationModel(args, inventory, hidden_dropout=_hidden_dropout(job, args), packing=job.data.packing)
    static_key = (
        astuple(job.parallel),
        job.train.use_distributed_optimizer,
        job.train.bf16 or job.train.fp16,
        ops,
        job.train.overlap_grad_reduce,
        job.train.ddp_bucket_size,
        job.train.train_type,
        str(job.lora),
        frozen_parts(job.train),
    )
    cache = static_cache if static_cache is not None else {}
    if static_key not in cache:
        # per stage: the first of its busiest ranks, and the trainable (dense, expert) elements on a rank
        cache[static_key] = [
            (max(stage_static(inventory, r), key=lambda s: s.optimizer), _trainable(inventory, lay, r))
            for r in range(lay.pp)
        ]
    ranks, grad_elements = [], []
    for pp_rank in range(lay.pp):
        static, trainable = cache[static_key][pp_rank]
        acts = model.stage(pp_rank)
        e = lay.dtype_bytes
        total = static.weights + static.grads + static.optimizer + acts.total
        ranks.append(
            RankEstimate(
                rank=pp_rank * (world_size // lay.pp) + static.rank_in_stage,
                pp_stage=pp_rank,
                weights_bytes=static.weights,
                grads_bytes=static.grads,
                optimizer_bytes=static.optimizer,
                activations_bytes=acts.total,
                total_bytes=total,
                layers_bytes=acts.layers,
                logits_bytes=acts.logits,
                temporary_bytes=acts.temporary,
                lora_bytes=static.lora_params * e,
                in_flight=acts.in_flight,
            )
        )
        grad_elements.append(trainable)
    time = None
    if with_time and cluster is not None:
        time = step_time(
            args,
            lay,
            ops,
            cluster,
            inventory.moe_layers,
            grad_elements,
            overlap_grad_reduce=job.train.overlap_grad_reduce,
            fp8=job.train.fp8_format is not None,
        )
    return Estimate(lay, ops, ranks, time, cluster, notes=_notes(job, args, lay, ops))


def _trainable(inventory: Inventory, lay: Layout, pp_rank: int) -> tuple[int, int]:
    dense = expert = 0
    for chunk in lay.stage_chunks(pp_rank):
        params = inventory.chunk(chunk)
        dense += int(params.numel[params.trainable & (params.buffer == DENSE)].sum())
        expert += int(params.numel[params.trainable & (params.buffer == EXPERT)].sum())
    return dense, expert


def _hidden_dropout(job: JobConfig, args: GPTModelArgs) -> float:
    value = job.model.hidden_dropout
    return value if value is not None else float(args.transformer.get("hidden_dropout", 0.0))


def _notes(job: JobConfig, args: GPTModelArgs, lay: Layout, ops: Ops) -> list[str]:
    notes = []
    if args.is_moe:
        notes.append("MoE activations assume balanced routing (tokens per expert = tokens x top-k / experts)")
    if job.data.packing and ops.attention != "te":
        notes.append("packing with SDPA: the block-diagonal mask is counted; GPU SDPA kernels with a mask are not")
    if lay.lora and ops.attention == "sdpa" and not ops.fused_adam and ops.norm == "torch":
        notes.append(
            "LoRA on CPU: megatron's frozen-weight linear (LinearWithFrozenWeight) materialises one copy "
            "of linear_proj's weight per sequence position in a bmm over SDPA's strided output; not counted"
        )
    if ops.attention == "te" or ops.norm == "fused":
        notes.append("GPU kernels' saved tensors (TE / Triton) follow their source; measured on CPU: torch paths")
    return notes
