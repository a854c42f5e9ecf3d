"""megatron-core internals our code relies on without patching them (it subclasses or reads them).

Not part of megatron-core's public API, so an upgrade may rename or change them; tests/test_compat.py checks each
still exists and, where a behaviour is relied on, that the source still holds the fragment that shows it. A
failing check names the user below that needs a look, instead of a run failing (or silently differing) later.
"""

from __future__ import annotations

# (module, attribute path, a fragment its source must hold or None, who relies on it and how)
UPSTREAM_INTERNALS: tuple[tuple[str, str, str | None, str], ...] = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel._postprocess", "output_weight",
     "models/kernel_modules.py overrides it to hand hidden states to the fused linear + cross-entropy"),
    ("megatron.core.transformer.dot_product_attention", "DotProductAttention.__init__", "context_parallel_size == 1",
     "models/attention.py builds its parent from a CP-1 copy of the config (the assert it works around)"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.__init__", "self.chained_optimizers",
     "training/optim.py inner_optimizers reads the optimizers a ChainedOptimizer holds"),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.__init__", "self.optimizer = optimizer",
     "training/optim.py torch_adams reads the torch optimizer inside (fused Adam, checkpoint step fixes)"),
    ("megatron.core.transformer.moe.moe_utils", "save_to_aux_losses_tracker", "reduce_group_has_dp",
     "training/moe_metrics.py reduces the tracker's entries by their values / reduce_group / avg_group keys"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding._apply_scaling",
     "high_freq_factor", "models/hf_config.py accepts Llama-3 rope scaling only with the factors it hard-codes"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.load_state_dict", 's["step"] = step',
     "training/checkpoint.py _adam_steps_set_aside / _restore_adam_steps: one step tensor put into every torch "
     "Adam state, then the loaded parameter state copied key by key"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.checkpoint_fully_reshardable_formats", None,
     "training/checkpoint.py _check_resume_layout: the layouts that resume at another TP / PP / EP"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_param_state_fully_reshardable",
     "distrib_optim_fully_reshardable_mem_efficient", "training/checkpoint.py OPTIMIZER_LAYOUTS: gather with gloo "
     "on DP rank 0 only"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.sharded_state_dict", "chained_optim_avoid_prefix",
     "training/checkpoint.py OPTIMIZER_LAYOUTS: tensor keys without the chain index, the same at any EP"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.load_state_dict", "sorted(state_dict.items())",
     "training/checkpoint.py _fit_to_optimizer_chain: a chain's state is {index: each optimizer's state}"),
    ("megatron.core.optimizer.optimizer", "param_group_identifier_keys", None,
     "training/checkpoint.py _fit_to_optimizer_chain: is_expert_parallel is part of a param group's identity"),
    ("megatron.core.optimizer", "get_standard_config_overrides", "wd_mult=0.0",
     "training/vision_tuning.py lr_overrides: a ViT / aligner rate joins the default weight-decay overrides"),
    ("megatron.core.optimizer.optimizer_config", "ParamKey.matches", "with_name_predicate",
     "training/vision_tuning.py lr_overrides: parameters picked by name (the tower's parts)"),
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler.get_lr", "param_group.get('max_lr'",
     "training/vision_tuning.py lr_overrides: each group's own max_lr / min_lr on the one schedule"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel.__init__", "scatter_embedding_sequence_parallel",
     "models/vlm.py: whole-sequence embeddings, image features placed, then the sequence-parallel scatter"),
)  # fmt: skip
