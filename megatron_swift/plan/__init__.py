"""Planner: per-rank memory and step-time estimates of a training job, and layouts that fit a cluster.

Modules: hardware (device table, cluster), layout (the job's sizes and module implementations), params
(weights / gradients / optimizer states, exact), activations (per-layer activation memory and the step's
peak), timing (step time, MFU), estimate (one job), search (layouts that fit), report and cli (output).
"""

from megatron_swift.plan.estimate import Estimate, RankEstimate, estimate
from megatron_swift.plan.hardware import Cluster, device_named
from megatron_swift.plan.layout import Target

__all__ = ["Cluster", "Estimate", "RankEstimate", "Target", "device_named", "estimate"]
