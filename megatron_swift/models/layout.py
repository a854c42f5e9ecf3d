"""Whether a model can be split over a parallel layout (pure arithmetic, every problem reported)."""

from __future__ import annotations

from megatron_swift.config import ParallelConfig
from megatron_swift.models.hf_config import GPTModelArgs


def model_layout_problems(args: GPTModelArgs, parallel: ParallelConfig) -> list[str]:
    """Whether a model of `args` can be split as `parallel` says (pure; every problem found)."""
    t = args.transformer
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    found = list(parallel.problems())
    if t["num_attention_heads"] % tp:
        found.append(f"num_attention_heads={t['num_attention_heads']} is not divisible by tensor parallel {tp}")
    if t["num_query_groups"] % tp:
        found.append(f"num_key_value_heads={t['num_query_groups']} is not divisible by tensor parallel {tp}")
    if args.is_mla:
        from megatron_swift.models.mla import mla_layout_problems

        found += mla_layout_problems(t, tp)
    found += pipeline_split_problems(t["num_layers"], parallel)
    if args.padded_vocab_size % tp:
        found.append(f"padded vocabulary {args.padded_vocab_size} is not divisible by tensor parallel {tp}")
    experts = t.get("num_moe_experts")
    if ep > 1 and not experts:
        found.append(f"expert parallel {ep} needs a MoE model")
    elif experts and experts % ep:
        found.append(f"num_experts={experts} is not divisible by expert parallel {ep}")
    etp = parallel.expert_tensor_parallel_size or tp
    if experts and t.get("add_bias_linear") and etp > 1:
        found.append(
            f"parallel.expert_tensor_parallel_size={etp} (it defaults to tensor_model_parallel_size): megatron-core "
            "builds biased experts (gpt-oss) only at expert tensor parallel 1; set parallel.expert_tensor_parallel_size"
            ": 1"
        )
    if args.vision is not None and parallel.context_parallel_size > 1:
        found.append(
            f"parallel.context_parallel_size={parallel.context_parallel_size} is not supported with a vision tower "
            f"({args.family.name}) yet: its features are placed over the whole sequence's placeholder tokens"
        )
    found += _deepstack_problems(args, parallel)
    return found


def _deepstack_problems(args: GPTModelArgs, parallel: ParallelConfig) -> list[str]:
    """A DeepStack tower (models/vlm.py) adds its features after the first decoder layers: they must be on the first
    pipeline stage's first model chunk, with the tower."""
    tower = args.vision
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size or 1
    if tower is None or not tower.deepstack_field or pp == 1:
        return []
    levels = len(args.vision_config[tower.deepstack_field])
    first, last = parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    if first is None:  # megatron-core's split: the layers after the last stage's evenly over the other stages
        first = (args.num_layers - (last or 0)) // (pp - (last is not None))
    if first // vpp >= levels:
        return []
    return [
        f"{tower.config_field}.{tower.deepstack_field} adds the vision tower's features after the first {levels} "
        f"decoder layers, which must all be on the first pipeline stage's first chunk with the tower, but it holds "
        f"{first // vpp}; set parallel.decoder_first_pipeline_num_layers to at least {levels * vpp}"
    ]


def pipeline_split_problems(num_layers: int, parallel: ParallelConfig) -> list[str]:
    """Whether `num_layers` split over the pipeline stages as megatron-core requires: evenly over
    pipeline x virtual pipeline, or with `decoder_first/last_pipeline_num_layers` on the first / last
    stage and the rest evenly over the middle stages (each a multiple of the virtual pipeline size)."""
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size or 1
    first, last = parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    if first is None and last is None:
        if num_layers % (pp * vpp):
            return [
                f"num_hidden_layers={num_layers} is not divisible by pipeline stages {pp * vpp} (pipeline x virtual "
                "pipeline); parallel.decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers split it "
                "unevenly"
            ]
        return []
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    fields = " + ".join(
        f"{value} (parallel.{name})"
        for name, value in (("decoder_first_pipeline_num_layers", first), ("decoder_last_pipeline_num_layers", last))
        if value is not None
    )
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
        return [
            f"num_hidden_layers={num_layers}: {fields} leave {middle_layers} layers for {middle_stages} middle stages"
        ]
    if middle_stages and middle_layers % (middle_stages * vpp):
        return [
            f"num_hidden_layers={num_layers}: {fields} leave {middle_layers} layers, not divisible by "
            f"{middle_stages} middle stages x virtual pipeline {vpp}"
        ]
    return []
