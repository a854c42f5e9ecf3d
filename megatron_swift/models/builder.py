"""Build megatron-core GPTModel chunks for this rank from translated HF model arguments.

Chooses the Transformer Engine layer spec on GPU when TE is installed and the local
(megatron-core only) spec otherwise, and fills in the parallel and precision fields of the
TransformerConfig. Returns one chunk per virtual pipeline stage (one without VPP).
"""

from __future__ import annotations

import torch

from megatron_swift._optional import has_transformer_engine
from megatron_swift.config import ConfigError, ParallelConfig
from megatron_swift.models.hf_config import GPTModelArgs


def use_transformer_engine(spec: str = "auto") -> bool:
    """`auto`: TE on GPU when installed; `local`: megatron-core modules only; `te`: require TE."""
    if spec == "local":
        return False
    if spec == "te":
        if not torch.cuda.is_available():
            raise ConfigError("model.spec=te needs a GPU; use spec=local or auto on CPU")
        if not has_transformer_engine():
            raise ConfigError("model.spec=te needs transformer-engine: pip install 'megatron-swift[gpu]'")
        return True
    if spec != "auto":
        raise ConfigError(f"model.spec={spec!r}: choose auto, local or te")
    return torch.cuda.is_available() and has_transformer_engine()


def transformer_config(
    args: GPTModelArgs,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    perform_initialization: bool = True,
    **overrides,
):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    on_cpu = not torch.cuda.is_available()
    if args.padded_vocab_size % parallel.tensor_model_parallel_size:
        raise ConfigError(
            f"padded vocabulary {args.padded_vocab_size} is not divisible by "
            f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size}"
        )
    kwargs = dict(
        args.transformer,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        perform_initialization=perform_initialization,
        # gloo pairs batched isend/irecv wrongly when the previous and next stage are the same rank
        # (silently wrong losses with VPP); unbatched p2p is correct everywhere.
        batch_p2p_comm=not on_cpu,
        # Off unless asked: the plain paths are exact. Training turns them on per training/fusions.py.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    if args.is_moe:
        # The all-to-all dispatcher creates CUDA streams at construction; all-gather is exact and runs on CPU.
        kwargs["moe_token_dispatcher_type"] = "allgather" if on_cpu else "alltoall"
    kwargs.update(overrides)
    config = (MLATransformerConfig if args.is_mla else TransformerConfig)(**kwargs)
    for name, value in args.yarn.items():  # not TransformerConfig fields: GPTModel and the attention getattr them
        setattr(config, name, value)
    return config


def build_model_chunks(
    args: GPTModelArgs,
    config,
    *,
    spec: str = "auto",
    attention: str = "sdpa",
    kernels: str | None = None,
    fused_linear_cross_entropy: bool = False,
) -> list:
    """GPTModel chunks for this rank (parallel state must be initialised).

    `attention` picks the core attention of the local spec: `sdpa` (PyTorch's fused kernel, see
    models/attention.py) or `local` (megatron-core's DotProductAttention). The TE spec ignores it.
    `kernels` (auto | torch | triton | te, see models/kernel_modules.py) puts our RMSNorm and SwiGLU
    modules into the local spec; None keeps megatron-core's own modules (as the converters do).
    `fused_linear_cross_entropy` builds FusedLossGPTModel chunks, whose last stage hands the training
    loss hidden states instead of logits (training/step.py). A reward model (`args.reward_head`) builds
    RewardGPTModel chunks (models/reward.py).
    """
    if attention not in ("sdpa", "local"):
        raise ConfigError(f"model.attention={attention!r}: choose sdpa or local")
    if attention == "local" and args.is_mla and not use_transformer_engine(spec):
        raise ConfigError(
            "model.attention=local: megatron-core 0.16's DotProductAttention cannot be built for multi-latent "
            "attention (it takes no separate key / value head sizes); use model.attention=sdpa"
        )
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_swift.models.gpt import GPTModel

    te = use_transformer_engine(spec)
    backends = {}
    if kernels is not None or fused_linear_cross_entropy:
        from megatron_swift.models.kernel_modules import kernel_backends

        backends = kernel_backends(kernels or "auto", te, fused_linear_cross_entropy)
    model_cls, model_kwargs = GPTModel, {}
    if fused_linear_cross_entropy:
        from megatron_swift.models.kernel_modules import FusedLossGPTModel

        model_cls, model_kwargs = FusedLossGPTModel, {"loss_backend": backends["fused_linear_cross_entropy"]}
    if args.reward_head:  # models/reward.py: the score head instead of the output layer (none to tie)
        from megatron_swift.models.reward import RewardGPTModel

        model_cls = RewardGPTModel
    if args.vision is not None:  # models/vlm.py: the family's vision tower in front of the decoder
        if fused_linear_cross_entropy or args.reward_head:
            raise ConfigError(
                f"{'model.fused_linear_cross_entropy' if fused_linear_cross_entropy else 'train.task=rm'} is not "
                f"supported with a vision tower ({args.family.name}) yet"
            )
        from megatron_swift.models.vlm import VisionLanguageModel

        model_cls = VisionLanguageModel
        model_kwargs = dict(
            vision=args.vision,
            vision_config=args.vision_config,
            image_token_id=args.image_token_id,
            video_token_id=args.video_token_id,
        )
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        block_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=stage
        )
        if args.transformer.get("layernorm_zero_centered_gamma") or args.output_norms or args.window_rotary_base:
            from megatron_swift.models.layer_variants import use_layer_variants

            use_layer_variants(
                block_spec,
                zero_centered_norms=bool(args.transformer.get("layernorm_zero_centered_gamma")),
                output_norms=args.output_norms,
                window_rotary_base=args.window_rotary_base,
                te=te,
            )
        if not te and args.is_moe and args.transformer.get("add_bias_linear"):
            from megatron_swift.models.layer_variants import use_biased_expert_outputs

            use_biased_expert_outputs(block_spec)
        if not te and args.is_mla:
            from megatron_swift.models.mla import use_duplicated_down_projections

            use_duplicated_down_projections(block_spec)
        if not te and attention == "sdpa":
            from megatron_swift.models.attention import use_sdpa_core_attention

            use_sdpa_core_attention(block_spec)
        if kernels is not None and not te:
            from megatron_swift.models.kernel_modules import use_kernel_modules

            use_kernel_modules(block_spec, backends)
        chunks.append(
            model_cls(
                config=config,
                transformer_layer_spec=block_spec,
                vocab_size=args.padded_vocab_size,
                real_vocab_size=args.vocab_size,
                max_sequence_length=args.max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=args.share_embeddings_and_output_weights and not args.reward_head,
                position_embedding_type=args.position_embedding_type,
                rotary_base=args.rotary_base,
                rotary_percent=args.rotary_percent,
                rope_scaling=args.rope_scaling,
                rope_scaling_factor=args.rope_scaling_factor,
                seq_len_interpolation_factor=args.seq_len_interpolation_factor,
                vp_stage=stage,
                embedding_multiplier=args.embedding_multiplier,
                **model_kwargs,
            )
        )
    if args.is_moe:
        _expert_gradient_reduction(chunks, config)
    return chunks


def _expert_gradient_reduction(chunks, config) -> None:
    """Make DDP / finalize_model_grads reduce the routed experts' gradients once, over the ranks that share them.

    - megatron-core 0.16 marks an expert weight `allreduce=False` (reduced over the expert data-parallel group)
      only when expert_model_parallel_size > 1; otherwise DDP reduces it with the dense weights over data
      parallel. With expert_tensor_parallel_size < tensor_model_parallel_size the TP ranks hold the same experts
      and route different tokens (their sequence-parallel shards) to them, so the gradients must be summed over
      the TP ranks too: the expert data-parallel group has them, the data-parallel group does not (measured: at
      TP2 + SP, ETP1 each rank kept its own half of the expert gradients and the weights drifted apart).
    - An expert's linear_fc2 bias (gpt-oss) is tagged `sequence_parallel` like a dense RowParallelLinear's, so
      finalize_model_grads sums it over TP as well: twice with the reduction above, and across different
      experts at EP > 1. Each expert has seen all its tokens once the expert data-parallel reduction is done.
    - That bias is not tagged `tensor_model_parallel` (an expert's fc1 bias and weights are), so the gradient
      norm counts it on TP rank 0 only: the experts that TP rank 1 holds at EP > 1 lost theirs (measured: step-1
      norm 0.3% low at TP2 + SP + EP2). Tagged like the expert weights, it is counted as they are."""
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    shared_by_tp = config.expert_model_parallel_size == 1 and etp != config.tensor_model_parallel_size
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".mlp.experts." not in name:
                continue
            if shared_by_tp:
                param.allreduce = False
            if getattr(param, "sequence_parallel", False):
                param.sequence_parallel = False
            if name.endswith("linear_fc2.bias"):
                param.tensor_model_parallel = True
