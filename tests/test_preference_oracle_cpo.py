"""SimPO and ORPO against TRL's CPOTrainer (loss_type simpo) and ORPOTrainer: the same tuned tiny model, the same
pairs, fp32. TRL's numbers come from its `get_batch_loss_metrics` on the same token ids (one pair per call, so its
loss is that pair's), its gradient from the backward of that loss over several pairs; ours from the training path
(tests/test_preference_oracle.py's `_ours`)."""

from __future__ import annotations

import pytest
import torch

from tests.test_preference_oracle import STEP_PAIRS, TOL, _ours, tuned  # noqa: F401 (tuned: the fixture)

CASES = {
    # task, our rlhf section, TRL trainer, TRL config fields
    "simpo": ("simpo", {"beta": 2.0, "simpo_gamma": 0.8, "cpo_alpha": 0.3},
              "cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.8, "cpo_alpha": 0.3}),
    "simpo_smoothed": ("simpo", {"label_smoothing": 0.1, "cpo_alpha": 0.0},
                       "cpo", {"loss_type": "simpo", "label_smoothing": 0.1, "cpo_alpha": 0.0}),
    "orpo": ("orpo", {"beta": 0.3}, "orpo", {"beta": 0.3}),
}  # fmt: skip
KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def _sides(pairs: list, pad_id: int) -> dict:
    """TRL's (old-style) tokenized batch of `pairs` (data/pairs.py PairSamples, read directly, not through our
    collate): input ids, attention mask and labels (-100 where the sample's loss weight is 0) of each side, padded."""
    out = {}
    for side in ("chosen", "rejected"):
        samples = [getattr(pair, side) for pair in pairs]
        length = max(len(sample.ids) for sample in samples)
        ids = torch.full((len(samples), length), pad_id)
        labels = torch.full((len(samples), length), -100)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        for i, sample in enumerate(samples):
            sample_ids = torch.from_numpy(sample.ids).long()
            ids[i, : len(sample_ids)], attention[i, : len(sample_ids)] = sample_ids, 1
            scored = torch.from_numpy(sample.weights) > 0
            labels[i, : len(sample_ids)] = torch.where(scored, sample_ids, torch.full_like(sample_ids, -100))
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels}
    return out


def _trl(tuned, tmp_path, trainer_name: str, config: dict, pairs: list):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config_cls, trainer_cls = {"cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}[trainer_name]
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    args = config_cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=1, **config)  # fmt: skip
    unused = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # batches are given directly
    trainer = trainer_cls(model=model, args=args, processing_class=tokenizer, train_dataset=unused)
    trainer.model.train()
    found = []
    with torch.no_grad():
        for pair in pairs:
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _sides([pair], tokenizer.pad_token_id))
            found.append({"loss": float(loss), **{key: float(metrics[key]) for key in KEYS}})
    trainer.model.zero_grad()
    step = _sides(pairs[:STEP_PAIRS], tokenizer.pad_token_id)
    trainer.get_batch_loss_metrics(trainer.model, step)[0].backward()
    grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
    return found, torch.linalg.vector_norm(torch.stack(grads)).item()


@pytest.mark.parametrize("case", [c if c != "simpo_smoothed" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])  # fmt: skip
def test_simpo_and_orpo_per_pair_values_equal_trl(tiny_models, tuned, tmp_path, case):  # noqa: F811
    task, rlhf, trainer_name, trl_config = CASES[case]
    ours, _, grad_norm, pairs, _ = _ours(tiny_models, tuned, tmp_path, rlhf, task)
    theirs, trl_grad_norm = _trl(tuned, tmp_path, trainer_name, trl_config, pairs)
    assert grad_norm == pytest.approx(trl_grad_norm, rel=1e-5), (grad_norm, trl_grad_norm)
    worst = {}
    for pair, (mine, trl) in enumerate(zip(ours, theirs, strict=True)):
        for key, expected in trl.items():
            worst[key] = max(worst.get(key, 0.0), abs(mine[key] - expected))
            assert mine[key] == pytest.approx(expected, abs=TOL), (case, pair, key, mine[key], expected)
    assert len({round(pair["loss"], 6) for pair in theirs}) > 1
    print(f"{case}: max abs diff vs TRL " + ", ".join(f"{key} {value:.1e}" for key, value in worst.items())
          + f"; grad norm {grad_norm:.6g} vs {trl_grad_norm:.6g}")  # fmt: skip
