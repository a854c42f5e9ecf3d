"""Text renderings of an estimate and of a search (the CLI's and the training run's start-up output)."""

from __future__ import annotations

from megatron_swift.plan.estimate import Estimate
from megatron_swift.plan.hardware import GIB


def gib(value: int | float) -> str:
    return f"{value / GIB:.1f}"


def layout_line(est: Estimate) -> str:
    lay = est.layout
    parts = [f"TP {lay.tp}", f"PP {lay.pp}" + (f" x VPP {lay.vpp}" if lay.vpp > 1 else ""), f"CP {lay.cp}"]
    if lay.ep > 1 or lay.etp != lay.tp:
        parts.append(f"EP {lay.ep} (expert TP {lay.etp})")
    parts.append(f"DP {lay.dp}")
    flags = [
        name
        for name, on in (
            ("sequence parallel", lay.sp),
            ("distributed optimizer", lay.distributed_optimizer),
            ("LoRA", lay.lora),
        )
        if on
    ]
    recompute = lay.recompute or "none"
    if lay.recompute == "full":
        recompute += f" ({lay.recompute_method}, {lay.recompute_num_layers} layer(s))"
    flags.append(f"recompute {recompute}")
    return (
        f"{', '.join(parts)}; {', '.join(flags)}; micro-batch {lay.micro_batch_size} x {lay.num_microbatches} "
        f"per step, seq {lay.seq_length}, {'bf16/fp16' if lay.mixed_precision else 'fp32'}"
    )


def memory_table(est: Estimate) -> list[str]:
    device = est.cluster.memory_bytes if est.cluster else None
    header = (
        f"{'stage':>5} {'rank':>5} {'layers':>9} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7}"
    )
    lines = [header + (f"  of {gib(device)} GiB" if device else "") + "   (GiB per rank, worst rank of each stage)"]
    for rank in est.ranks:
        chunks = est.layout.stage_chunks(rank.pp_stage)
        layers = sorted(i for c in chunks for i in c.layers)
        span = f"{layers[0]}-{layers[-1]}" if layers else "-"
        fits = ""
        if est.cluster is not None:
            fits = "  ok" if rank.total_bytes <= est.cluster.usable_bytes else "  DOES NOT FIT"
        lines.append(
            f"{rank.pp_stage:>5} {rank.rank:>5} {span:>9} {gib(rank.weights_bytes):>8} {gib(rank.grads_bytes):>7} "
            f"{gib(rank.optimizer_bytes):>7} {gib(rank.activations_bytes):>7} {gib(rank.total_bytes):>7}{fits}"
        )
    worst = max(est.ranks, key=lambda r: r.total_bytes)
    lines.append(
        f"activations of stage {worst.pp_stage}: layers {gib(worst.layers_bytes)} ({worst.in_flight} micro-batch(es) "
        f"in flight), loss {gib(worst.logits_bytes)}, transients {gib(worst.temporary_bytes)}"
    )
    if worst.lora_bytes:
        lines.append(
            f"LoRA adapters: {worst.lora_bytes / 2**20:.1f} MiB of weights; their gradients and optimizer "
            "states are the grads / optim columns (the base is frozen)"
        )
    return lines


def time_lines(est: Estimate) -> list[str]:
    if est.time is None or est.cluster is None:
        return []
    t, c = est.time, est.cluster
    parts = (
        f"compute {t.compute_s:.2f}, pipeline bubble {t.bubble_s:.2f}, TP {t.tp_comm_s:.2f}, CP {t.cp_comm_s:.2f}, "
        f"EP {t.ep_comm_s:.2f}, DP exposed {t.dp_comm_s:.2f}, optimizer {t.optimizer_s:.2f}"
    )
    links = (
        f"NVLink {c.device.intra_node_bytes_s / 1e9:.0f} GB/s / network {c.device.inter_node_bytes_s / 1e9:.0f} GB/s"
    )
    return [
        f"step time ~ {t.step_s:.2f} s ({parts}); MFU ~ {100 * t.mfu:.0f}%",
        f"assumptions: {c.device.name}, {c.nodes} node(s) x {c.gpus_per_node}; matmuls at {c.compute_efficiency:.0%} "
        f"of {c.device.bf16_flops / 1e12:.0f} TFLOP/s; collectives at {c.comm_efficiency:.0%} of {links} per GPU; "
        f"{c.reserve_gib:.0f} GiB per GPU kept for CUDA context, NCCL and fragmentation",
    ]


def render(est: Estimate, title: str) -> str:
    lines = [title, "layout: " + layout_line(est), *memory_table(est), *time_lines(est)]
    lines += [f"note: {note}" for note in est.notes]
    return "\n".join(lines)


def startup_line(est: Estimate, device_bytes: int | None) -> str:
    """One line for the training run's start-up: its own layout's estimate, in MiB when under a GiB (a tiny
    model's figures would all print as 0.0 GiB)."""
    worst = max(est.ranks, key=lambda r: r.total_bytes)
    unit, scale = ("GiB", GIB) if worst.total_bytes >= GIB else ("MiB", GIB / 1024)

    def size(value: int) -> str:
        return f"{value / scale:.1f}"

    text = (
        f"memory estimate (mswift-plan): {size(worst.total_bytes)} {unit} on the busiest rank (stage "
        f"{worst.pp_stage}: weights {size(worst.weights_bytes)}, grads {size(worst.grads_bytes)}, optimizer "
        f"{size(worst.optimizer_bytes)}, activations {size(worst.activations_bytes)})"
    )
    if device_bytes:
        text += f" of {gib(device_bytes)} GiB"
    return text
