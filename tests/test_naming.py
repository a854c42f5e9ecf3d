"""Canonical megatron-core names: global layer/expert indices and Transformer Engine aliases."""

from types import SimpleNamespace

from megatron_swift.models.naming import canonical_name


def _layer(layer_number: int, experts: list[int] | None = None):
    return SimpleNamespace(layer_number=layer_number, mlp=SimpleNamespace(local_expert_indices=experts))


def test_pipeline_stage_layers_get_global_indices():
    layers = [_layer(5), _layer(6)]  # second pipeline stage of an 8-layer model
    assert canonical_name("decoder.layers.1.mlp.linear_fc2.weight", layers) == "decoder.layers.5.mlp.linear_fc2.weight"
    assert canonical_name("embedding.word_embeddings.weight", layers) == "embedding.word_embeddings.weight"


def test_expert_parallel_ranks_get_global_expert_indices():
    layers = [_layer(1, experts=[2, 3])]  # EP rank 1 of 2 with 4 experts
    local = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"
    assert canonical_name(local, layers) == "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    grouped = "decoder.layers.0.mlp.experts.linear_fc2.weight0"  # TEGroupedMLP naming
    assert canonical_name(grouped, layers) == "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"


def test_transformer_engine_fused_norms_map_to_local_spec_names():
    layers = [_layer(3)]
    assert (
        canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", layers)
        == "decoder.layers.2.input_layernorm.weight"
    )
    assert (
        canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", layers)
        == "decoder.layers.2.pre_mlp_layernorm.weight"
    )
