"""Step time and MFU of a layout: FLOPs at an assumed efficiency, plus the communication that is not hidden.

- Compute: per micro-batch and pipeline stage, the FLOPs of training/flops.py's convention (matrix
  multiplies, 2 per multiply-add, training = 3x forward, LoRA 2x) for the stage's layers on its tokens,
  divided over TP x CP (and over EP for routed experts), plus the forward of whatever is recomputed (full:
  every recomputed layer; selective: the core attention), at `compute_efficiency` x peak.
- Tensor parallel: per layer and micro-batch, two all-reduces forward and two backward (or, with SP, the
  all-gather / reduce-scatter pairs that move the same bytes) of the [s, b, h] activations, not overlapped;
  full recomputation repeats the forward's (as it does CP's and EP's).
- Context parallel: the K / V all-gather forward and its reduce-scatter backward, per layer.
- Expert parallel: dispatch and combine all-to-alls forward and backward per MoE layer, for the routed tokens.
- Pipeline: 1F1B takes (m + PP - 1) micro-batch slots of the slowest stage, interleaved (m + (PP - 1) / VPP).
- Data parallel: the fp32 gradient all-reduce (distributed optimizer: reduce-scatter + bf16 all-gather of
  the parameters); with overlap_grad_reduce only what outlasts the last micro-batch's backward shows.
- Optimizer: memory-bound, the main parameters, moments and gradients read and written once at HBM speed.
Each collective runs at the link of the ranks it spans (NVLink within a node, else the network), ring cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.plan.hardware import Cluster
from megatron_swift.plan.layout import Layout, Ops
from megatron_swift.training.flops import attention_flops, flops_per_token, mlp_flops


@dataclass
class StepTime:
    step_s: float
    compute_s: float  # the slowest stage's compute over all its micro-batches
    bubble_s: float
    tp_comm_s: float
    cp_comm_s: float
    ep_comm_s: float
    dp_comm_s: float  # exposed
    optimizer_s: float
    mfu: float


def _ring(bytes_: float, ranks: int, bandwidth: float) -> float:
    return 0.0 if ranks <= 1 else bytes_ * (ranks - 1) / ranks / bandwidth


def layer_flops(args: GPTModelArgs, seq: int, moe: bool) -> tuple[float, float, float]:
    """Forward FLOPs per token of one layer: (attention incl. projections, core attention alone, MLP)."""
    attention, core = attention_flops(args.transformer, seq)
    return attention, core, mlp_flops(args.transformer, moe)


def step_time(
    args: GPTModelArgs,
    lay: Layout,
    ops: Ops,
    cluster: Cluster,
    moe_layers: list[bool],
    grad_elements: list[tuple[int, int]],
    *,
    overlap_grad_reduce: bool,
    fp8: bool = False,
) -> StepTime:
    """`grad_elements`: per pipeline stage, (dense, expert) trainable elements on one rank."""
    device, e = cluster.device, lay.dtype_bytes
    peak = (device.fp8_flops or device.bf16_flops) if fp8 else device.bf16_flops
    rate = peak * cluster.compute_efficiency
    tokens = lay.micro_batch_size * lay.seq_length  # one micro-batch, whole sequence
    multiplier = 2 if lay.lora else 3
    h, vocab = args.transformer["hidden_size"], args.vocab_size
    tp_bw = cluster.link_bytes_s(lay.tp)
    cp_bw = cluster.link_bytes_s(lay.tp * lay.cp)
    ep_bw = cluster.link_bytes_s(lay.etp * lay.ep)
    t = args.transformer
    kv_bytes = lay.tokens * 2 * t["num_query_groups"] * t["kv_channels"] // lay.tp * e
    kinds = {moe: layer_flops(args, lay.seq_length, moe) for moe in set(moe_layers)}
    # Full recomputation repeats the forward's collectives (half of a layer's) in the backward.
    repeat = 1.5 if lay.recompute == "full" else 1.0
    # an all-reduce moves 2 (t - 1) / t of the [s, b, h] activation, i.e. _ring of twice its bytes
    per_layer_tp = repeat * 4 * _ring(2 * lay.tokens * h * e, lay.tp, tp_bw)
    per_layer_cp = repeat * 2 * _ring(lay.cp * kv_bytes, lay.cp, cp_bw)
    # each rank's routed token copies, (EP - 1) / EP of them to other ranks, per all-to-all
    per_moe_ep = repeat * 4 * _ring(lay.sp_tokens * t.get("moe_router_topk", 0) * h * e, lay.ep, ep_bw)
    stage_times = []
    for pp_rank in range(lay.pp):
        flops = comm_tp = comm_cp = comm_ep = 0.0
        for chunk in lay.stage_chunks(pp_rank):
            for moe in kinds:
                count = sum(moe_layers[i] == moe for i in chunk.layers)
                attention, core, mlp = kinds[moe]
                recomputed = {"full": attention + mlp, "selective": core}.get(lay.recompute or "", 0.0)
                flops += count * (multiplier * (attention + mlp) + recomputed) * tokens
                comm_tp += count * per_layer_tp
                comm_cp += count * per_layer_cp
                comm_ep += count * per_moe_ep if moe else 0.0
            if chunk.post_process:
                flops += multiplier * 2 * h * vocab * tokens
        compute = flops / (lay.tp * lay.cp) / rate
        stage_times.append((compute + comm_tp + comm_cp + comm_ep, compute, comm_tp, comm_cp, comm_ep))
    slowest = max(stage_times)
    per_microbatch, compute, tp_total, cp_total, ep_total = slowest
    m, slots = lay.num_microbatches, lay.num_microbatches
    if lay.pp > 1:
        slots = m + (lay.pp - 1) / lay.vpp
    pipeline = per_microbatch * slots
    # Data parallel: gradients in fp32; the distributed optimizer reduce-scatters them and all-gathers bf16 params.
    dp_comm = 0.0
    for dense, expert in grad_elements:
        stage = 0.0
        for elements, ranks in ((dense, lay.dp * lay.cp), (expert, lay.edp)):
            span = lay.world // lay.pp if ranks > 1 else 1
            bandwidth = cluster.link_bytes_s(span)
            if lay.distributed_optimizer:
                stage += _ring(elements * 4, ranks, bandwidth) + _ring(elements * e, ranks, bandwidth)
            else:
                stage += 2 * _ring(elements * 4, ranks, bandwidth)
        dp_comm = max(dp_comm, stage)
    if overlap_grad_reduce:
        dp_comm = max(0.0, dp_comm - per_microbatch * 2 / 3)  # hidden behind the last backward
    shard = max(d + x for d, x in grad_elements) / (lay.dp * lay.cp if lay.distributed_optimizer else 1)
    optimizer = shard * ((4 if lay.mixed_precision else 0) + 8 + 4) * 2 / device.hbm_bytes_s
    step = pipeline + dp_comm + optimizer
    model_flops = flops_per_token(t, vocab, lay.seq_length, lay.lora) * tokens * m * lay.dp
    mfu = model_flops / (step * peak * lay.world)
    return StepTime(
        step,
        compute * m,
        per_microbatch * (slots - m),
        tp_total * m,
        cp_total * m,
        ep_total * m,
        dp_comm,
        optimizer,
        mfu,
    )
