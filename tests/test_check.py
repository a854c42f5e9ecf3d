"""Acceptance: megatron-core logits equal HF logits (fp32, <= 1e-4) at TP1, TP2, PP2 (+EP2 for MoE),
and a checkpoint written at one TP loads at another with the same logits. A vision-language family is checked on
text + images (converters.check.sample_vision_batch) at TP1 / TP2 / TP2 + SP / PP2, and on text only at TP2 / PP2."""

import pytest
import torch

from converters.check import check, compare_valid, hf_logits, sample_tokens, sample_vision_batch
from converters.convert import hf_to_mcore
from megatron_swift.checkpoint.hf import load_hf_config
from megatron_swift.config import ParallelConfig
from megatron_swift.models import all_families
from tests.dist_matrix import run_cases

TOL = 1e-4
TP2 = {"tensor_model_parallel_size": 2}
PP2 = {"pipeline_model_parallel_size": 2}
EP2 = {"expert_model_parallel_size": 2}
TP1 = {}


@pytest.mark.parametrize("family", sorted(all_families()))
def test_check_tp1(family, tiny_models, converted):
    result = check(tiny_models[family], converted[family])
    assert result["max_abs_diff"] <= TOL, result
    assert result["argmax_agreement"] == 1.0


def test_every_family_at_tp2_pp2_ep2_in_one_two_rank_launch(tiny_models, converted):
    tokens = sample_tokens(384)
    cases = []
    for name, family in sorted(all_families().items()):
        # Biased experts (gpt-oss) are built at expert tensor parallel 1 only (megatron-core).
        tp2 = {**TP2, "expert_tensor_parallel_size": 1} if family.linear_bias and family.moe else TP2
        layouts = [tp2, PP2] + ([EP2] if family.moe else [])
        cases += [(name, layout, tokens) for layout in layouts]
        if family.vision:  # text + images too; sequence parallel scatters the embeddings after the images' merge
            images = sample_vision_batch(load_hf_config(tiny_models[name]))
            cases += [(name, layout, images) for layout in (TP2, {**TP2, "sequence_parallel": True}, PP2)]
    logits = run_cases([(converted[name], layout, batch) for name, layout, batch in cases], tokens, world_size=2)
    reference = {name: hf_logits(tiny_models[name], tokens) for name in tiny_models}
    failures = []
    for (name, layout, batch), candidate in zip(cases, logits, strict=True):
        expected = reference[name] if batch is tokens else hf_logits(tiny_models[name], batch)
        result = compare_valid(expected, candidate, batch)
        if result["max_abs_diff"] > TOL or result["argmax_agreement"] < 1.0:
            failures.append((name, layout, result))
    assert not failures, failures
    assert any(batch is not tokens for _, _, batch in cases)  # a vision-language family was checked with images


def test_checkpoint_written_at_tp1_and_tp2_loads_at_both(tiny_models, converted, tmp_path):
    saved_tp1 = converted["llama"]
    saved_tp2 = hf_to_mcore(tiny_models["llama"], tmp_path / "tp2", parallel=ParallelConfig(**TP2))
    tokens = sample_tokens(384, seed=3)
    tp1_from_tp1, tp1_from_tp2 = run_cases([(saved_tp1, TP1), (saved_tp2, TP1)], tokens, world_size=1)
    tp2_from_tp1, tp2_from_tp2 = run_cases([(saved_tp1, TP2), (saved_tp2, TP2)], tokens, world_size=2)
    # Same weights in the same layout: bitwise equal whichever layout wrote the checkpoint.
    assert torch.equal(tp1_from_tp2, tp1_from_tp1)
    assert torch.equal(tp2_from_tp1, tp2_from_tp2)
    # Across layouts only the reduction order differs.
    torch.testing.assert_close(tp2_from_tp1, tp1_from_tp1, rtol=0, atol=1e-5)
