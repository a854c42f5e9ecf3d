"""Rule kinds: fused layouts built independently here, inverse directions, TP shards, lookups."""

import pytest
import torch

from megatron_swift.models.families.common import DENSE_DECODER
from megatron_swift.models.mapping import FusedGateUp, FusedQKV, ModelDims, PaddedVocab

DIMS = ModelDims(num_attention_heads=6, num_query_groups=2, head_dim=4, vocab_size=10, padded_vocab_size=16)
HIDDEN = 5


def _qkv():
    q = torch.randn(DIMS.num_attention_heads * DIMS.head_dim, HIDDEN)
    k = torch.randn(DIMS.num_query_groups * DIMS.head_dim, HIDDEN)
    v = torch.randn(DIMS.num_query_groups * DIMS.head_dim, HIDDEN)
    return q, k, v


def test_fused_qkv_is_megatrons_per_group_layout():
    q, k, v = _qkv()
    fused = FusedQKV("x", q="q", k="k", v="v").to_mcore([q, k, v], DIMS)
    hd, per_group = DIMS.head_dim, DIMS.num_attention_heads // DIMS.num_query_groups
    expected = []
    for g in range(DIMS.num_query_groups):  # [q heads of group g; k_g; v_g] for each group
        expected += [
            q[g * per_group * hd : (g + 1) * per_group * hd],
            k[g * hd : (g + 1) * hd],
            v[g * hd : (g + 1) * hd],
        ]
    assert torch.equal(fused, torch.cat(expected))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_round_trip(bias):
    q, k, v = (t[:, 0].contiguous() for t in _qkv()) if bias else _qkv()
    rule = FusedQKV("x", q="q", k="k", v="v")
    for original, back in zip((q, k, v), rule.to_hf(rule.to_mcore([q, k, v], DIMS), DIMS), strict=True):
        assert torch.equal(original, back)


def test_fused_qkv_tp_shard_holds_whole_groups():
    q, k, v = _qkv()
    rule = FusedQKV("x", q="q", k="k", v="v")
    shard = rule.tp_shard(rule.to_mcore([q, k, v], DIMS), 0, 1, 2)
    group1 = ModelDims(3, 1, DIMS.head_dim, DIMS.vocab_size, DIMS.padded_vocab_size)
    rows = 3 * DIMS.head_dim
    hd = DIMS.head_dim
    assert torch.equal(shard, rule.to_mcore([q[rows:], k[hd:], v[hd:]], group1))


def test_gate_up_shards_each_half():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    rule = FusedGateUp("x", gate="g", up="u")
    full = rule.to_mcore([gate, up], DIMS)
    assert torch.equal(rule.tp_shard(full, 0, 1, 2), torch.cat([gate[4:], up[4:]]))
    assert all(torch.equal(a, b) for a, b in zip(rule.to_hf(full, DIMS), (gate, up), strict=True))


def test_padded_vocab_pads_with_zeros_and_strips():
    weight = torch.randn(DIMS.vocab_size, 3)
    rule = PaddedVocab("x", hf_name="w")
    padded = rule.to_mcore([weight], DIMS)
    assert padded.shape == (16, 3) and torch.equal(padded[10:], torch.zeros(6, 3))
    assert torch.equal(rule.to_hf(padded, DIMS)[0], weight)


def test_ruleset_resolves_templates_and_known_hf_names():
    rule, bindings = DENSE_DECODER.resolve("decoder.layers.11.mlp.linear_fc1.weight")
    assert bindings == {"layer": "11"}
    assert rule.hf_names(bindings) == ["model.layers.11.mlp.gate_proj.weight", "model.layers.11.mlp.up_proj.weight"]
    assert DENSE_DECODER.is_known_hf("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not DENSE_DECODER.is_known_hf("model.layers.3.self_attn.extra.weight")
    with pytest.raises(KeyError, match="no mapping rule"):
        DENSE_DECODER.resolve("decoder.layers.0.mlp.unknown.weight")
