"""Whether a model can be split over a parallel layout (pure arithmetic, every problem reported)."""

from __future__ import annotations

from megatron_swift.config import ParallelConfig
from megatron_swift.models.hf_config import GPTModelArgs


def model_layout_problems(args: GPTModelArgs, parallel: ParallelConfig) -> list[str]:
    """Whether a model of `args` can be split as `parallel` says (pure; every problem found)."""
    t = args.transformer
    tp, pp, ep = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
    )
    found = list(parallel.problems())
    if t["num_attention_heads"] % tp:
        found.append(f"num_attention_heads={t['num_attention_heads']} is not divisible by tensor parallel {tp}")
    if t["num_query_groups"] % tp:
        found.append(f"num_key_value_heads={t['num_query_groups']} is not divisible by tensor parallel {tp}")
    stages = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if t["num_layers"] % stages:
        found.append(
            f"num_hidden_layers={t['num_layers']} is not divisible by pipeline stages {stages} "
            "(pipeline x virtual pipeline)"
        )
    if args.padded_vocab_size % tp:
        found.append(f"padded vocabulary {args.padded_vocab_size} is not divisible by tensor parallel {tp}")
    experts = t.get("num_moe_experts")
    if ep > 1 and not experts:
        found.append(f"expert parallel {ep} needs a MoE model")
    elif experts and experts % ep:
        found.append(f"num_experts={experts} is not divisible by expert parallel {ep}")
    return found
