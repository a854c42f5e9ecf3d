"""A family's MoE fields (HF config names, router kind) -> megatron-core MoE TransformerConfig arguments.

Routers: softmax (Mixtral / Qwen-MoE: softmax over all experts, top-k, optionally renormalised) and sigmoid
(DeepSeek-V3: sigmoid scores, top-k chosen on scores + a per-expert bias, optionally within the best
groups, renormalised and scaled). Pure translation; what megatron-core cannot express is refused naming
the HF field.
"""

from __future__ import annotations

from megatron_swift.config import ConfigError
from megatron_swift.models.family import MoEFields


def _field(hf_config, name: str | None, default=None):
    return getattr(hf_config, name, default) if name else default


def _router_args(hf_config, fields: MoEFields, topk: int, norm_topk: bool) -> dict:
    if fields.score_function == "softmax":
        # HF: softmax over all experts, then top-k, then (optionally) renormalise the k weights.
        # Renormalised == softmax over the top-k logits == megatron's pre_softmax=False.
        return dict(moe_router_pre_softmax=not norm_topk, moe_router_score_function="softmax")
    if fields.score_function != "sigmoid":
        raise ValueError(f"unknown router score function {fields.score_function!r}")
    if not norm_topk and topk > 1:
        # megatron-core's sigmoid router always renormalises the top-k scores (moe_utils.topk_routing_with_
        # score_function); HF's leaves them as they are without norm_topk_prob.
        raise ConfigError(f"{fields.norm_topk_prob}=false is not supported with sigmoid routing: megatron-core "
                          "always renormalises the top-k sigmoid scores")  # fmt: skip
    args = dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=False)
    if fields.expert_bias:
        args["moe_router_enable_expert_bias"] = True
    groups = int(_field(hf_config, fields.num_groups, 1) or 1)
    group_topk = int(_field(hf_config, fields.group_topk, 1) or 1)
    if groups > 1:
        # HF ranks a group by its two best experts; megatron-core by its best topk // group_topk.
        if topk // group_topk != 2:
            raise ConfigError(
                f"{fields.top_k}={topk} with {fields.group_topk}={group_topk}: megatron-core ranks expert groups "
                f"by their top {fields.top_k} // {fields.group_topk} experts, HF by their top 2; supported when "
                "that quotient is 2 (as DeepSeek-V3's 8 // 4)"
            )
        args.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    elif group_topk != 1:
        raise ConfigError(f"{fields.group_topk}={group_topk} needs {fields.num_groups} > 1")
    scale = _field(hf_config, fields.topk_scaling_factor)
    if scale is not None and float(scale) != 1.0:
        args["moe_router_topk_scaling_factor"] = float(scale)
    return args


def moe_args(hf_config, fields: MoEFields) -> dict:
    """TransformerConfig MoE keyword arguments for an HF config with the family's MoE `fields`."""
    num_layers = hf_config.num_hidden_layers
    norm_topk = fields.norm_topk_prob
    if isinstance(norm_topk, str):
        norm_topk = bool(getattr(hf_config, norm_topk, False))
    topk = int(getattr(hf_config, fields.top_k))
    moe_ffn = int(getattr(hf_config, fields.expert_ffn_hidden_size))
    moe = dict(
        num_moe_experts=int(getattr(hf_config, fields.num_experts)),
        moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn,
        moe_aux_loss_coeff=float(getattr(hf_config, fields.aux_loss_coeff, 0.0) or 0.0),
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        **_router_args(hf_config, fields, topk, norm_topk),
    )
    shared = 0
    if fields.shared_expert_ffn_hidden_size:
        shared = int(getattr(hf_config, fields.shared_expert_ffn_hidden_size, 0) or 0)
    elif fields.shared_expert_count:
        shared = moe_ffn * int(getattr(hf_config, fields.shared_expert_count, 0) or 0)
    if shared:
        moe["moe_shared_expert_intermediate_size"] = shared
        moe["moe_shared_expert_gate"] = fields.shared_expert_gate
    sparse = [True] * num_layers
    if fields.sparse_step:
        step = int(getattr(hf_config, fields.sparse_step, 1) or 1)
        sparse = [(i + 1) % step == 0 for i in range(num_layers)]
    if fields.dense_layers:
        for i in getattr(hf_config, fields.dense_layers, None) or []:
            sparse[i] = False
    if fields.first_dense_layers:
        for i in range(min(int(getattr(hf_config, fields.first_dense_layers, 0) or 0), num_layers)):
            sparse[i] = False
    if not all(sparse):
        moe["moe_layer_freq"] = [int(s) for s in sparse]
    return moe
