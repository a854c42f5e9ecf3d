"""MoE router losses of a training step, for the metrics: what Megatron-LM logs as `load_balancing_loss`.

megatron-core's routers add each layer's auxiliary loss (divided by its coefficient) to a process-global
tracker, once per micro-batch. After a step, `router_losses` reduces the tracker over ranks the way
megatron-core's `reduce_aux_losses_tracker_across_ranks` does (summed over pipeline stages and over the
loss's reduce group, averaged over data parallel and over its average group), reports each loss as the
mean over MoE layers and micro-batches (Megatron-LM's `track_moe_metrics` convention) and clears the
tracker. The reduction is ours only because megatron-core's averages use `ReduceOp.AVG`, which gloo
lacks; here an average is a sum divided by the group size, on every backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# megatron-core's load-balancing type -> the name its router tracks the loss under.
_TRACKED_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


def tracked_losses(config) -> list[str]:
    """Names megatron-core's routers track for this config (a loss with coefficient 0 is not computed)."""
    if not config.num_moe_experts:
        return []
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    if isinstance(types, str):
        types, coeffs = [types], [coeffs]
    pairs = zip(types, coeffs, strict=True)
    names = [_TRACKED_NAMES[kind] for kind, coeff in pairs if kind in _TRACKED_NAMES and coeff]
    return names + (["z_loss"] if config.moe_z_loss_coeff else [])


def _num_moe_layers(config) -> int:
    freq = config.moe_layer_freq
    layers = sum(freq) if isinstance(freq, list) else sum(1 for i in range(config.num_layers) if i % freq == 0)
    return layers + (config.mtp_num_layers or 0)


def _all_reduce_mean(values: torch.Tensor, group) -> None:
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group)


def router_losses(config, num_microbatches: int) -> dict[str, float]:
    """The last step's router losses (collective: every rank calls it after every step), tracker cleared."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_swift.distributed.runtime import comm_device

    names = tracked_losses(config)
    if not names:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    losses = {}
    for name in names:
        # A stage without MoE layers never creates the entry, yet joins the pipeline-stage sum.
        entry = tracker.setdefault(name, {"values": torch.zeros(num_layers, device=comm_device())})
        # megatron-core creates its entries on the loss's device (the GPU on GPU): collectives need that.
        entry["values"] = values = entry["values"].to(comm_device())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            dist.all_reduce(values, group=entry["reduce_group"])
            if not entry.get("reduce_group_has_dp", False):
                _all_reduce_mean(values, ps.get_data_parallel_group())
        if entry.get("avg_group") is not None:
            _all_reduce_mean(values, entry["avg_group"])
        losses[name] = float(values.sum()) / _num_moe_layers(config) / num_microbatches
        values.zero_()
    return losses
