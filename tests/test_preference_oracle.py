"""DPO against TRL's DPOTrainer: the same weights (a tuned policy, its base as the reference), the same pairs, fp32.

Our numbers come from the training path itself (the pairs' micro-batches from the data pipeline, the reference's
log-probs attached by `Preference.run`, the per-pair report of its loss function); TRL's from
`DPOTrainer._compute_loss` on the same token ids, one pair per call (its loss is then that pair's loss) and its
logged metrics. cDPO (`sigmoid` with label smoothing, TRL < 1.0's and ms-swift's) is TRL 1.x's `aot` loss on one
pair (sorting one pair is the identity, and `aot` is then cDPO's formula); reference-free is TRL with precomputed
reference log-probs of 0; `rpo_alpha` is TRL's `["sigmoid", "sft"]` with weights `[1, rpo_alpha]`.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_tuning import fine_tune
from tests.train_matrix import job_for

DPO = "examples/data/dpo_sample.jsonl"
PAIRS = 8
STEP_PAIRS = 4
VAL_PAIRS = 6
TOL = 1e-5

# (our rlhf section, TRL's DPOConfig fields, TRL's precomputed reference log-probs (None: its ref_model))
CASES = {
    "sigmoid": ({}, {}, None),
    "hinge": ({"loss_type": ["hinge"], "beta": 0.5}, {"loss_type": ["hinge"], "beta": 0.5}, None),
    "ipo": ({"loss_type": ["ipo"]}, {"loss_type": ["ipo"]}, None),
    "robust": ({"loss_type": ["robust"], "label_smoothing": 0.2}, {"loss_type": ["robust"], "label_smoothing": 0.2},
               None),
    "cdpo": ({"label_smoothing": 0.15}, {"loss_type": ["aot"], "label_smoothing": 0.15}, None),
    "weighted": ({"loss_type": ["sigmoid", "ipo", "hinge"], "loss_weights": [1.0, 0.5, 0.25]},
                 {"loss_type": ["sigmoid", "ipo", "hinge"], "loss_weights": [1.0, 0.5, 0.25]}, None),
    "rpo": ({"rpo_alpha": 0.7, "beta": 0.2}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7],
                                              "beta": 0.2}, None),
    "reference_free": ({"reference_free": True}, {"precompute_ref_log_probs": True}, 0.0),
}  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    """A policy that differs from its reference (the base) in a meaningful direction."""
    return fine_tune(tiny_models["llama"], tmp_path_factory.mktemp("tuned"), steps=6)


def _ours(tiny_models, tuned, tmp_path, rlhf: dict, task: str = "dpo"):
    """Per pair: loss, rewards and logps from our training path (world of size 1); the pairs' micro-batches; the
    grad norm of a step over the first STEP_PAIRS pairs."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.evaluate import validation_microbatches
    from megatron_swift.training.job import build_model, build_preference, check_job, check_weights
    from megatron_swift.training.optim import wrap_for_training
    from megatron_swift.training.preference import REPORT

    ref = {} if rlhf.get("reference_free") or task != "dpo" else {"ref_model": str(tiny_models["llama"])}
    job = job_for(str(tuned), DPO, str(tmp_path), {}, {"task": task, "global_batch_size": 1},
                  data={"seq_length": 64, "shuffle": False}, rlhf={**ref, **rlhf})  # fmt: skip
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        preference = build_preference(job, args, chunks, check_weights(job, chunks, args))
        data = build_train_data(job.data, AutoTokenizer.from_pretrained(tuned), task, 1, 0)
        found, batches = [], []
        with torch.no_grad():
            for _ in range(PAIRS):  # one pair per global batch: per-pair values, with RPO's token mean per pair
                (microbatch,) = data.batches.next_microbatches(0, 1, 1)
                batches.append({key: value.clone() for key, value in microbatch.items()})
                (report,) = preference.run(chunks, [microbatch], forward_only=True)
                found.append(dict(zip(REPORT, report["dpo"].tolist(), strict=True)))
        # Validation over the first VAL_PAIRS pairs in global batches of 4 (the last one filled up with 2 fillers).
        items = [data.batches.items[i] for i in range(VAL_PAIRS)]
        validated = preference.validate(chunks, validation_microbatches(items, data.batches.collate, 4, 1, 0, 1))
        # The gradient of one step over the first STEP_PAIRS pairs (one pair per micro-batch): its norm.
        chunks, optimizer, scheduler = wrap_for_training(chunks, job)
        step = [{key: value.clone() for key, value in batch.items()} for batch in batches[:STEP_PAIRS]]
        grad_norm = preference.train_step(chunks, optimizer, scheduler, step, args.vocab_size).grad_norm
    finally:
        destroy_distributed()
    pairs = [data.batches.items[i] for i in range(PAIRS)]  # unshuffled: batch i is pair i
    return found, batches, grad_norm, pairs, validated


def _trl_example(batch: dict) -> dict:
    """TRL's prompt / chosen / rejected ids for one pair micro-batch [2, seq]: the completion is the scored span."""
    rows = []
    for row in range(2):
        scored = batch["loss_mask"][row].nonzero().flatten()
        first, last = int(scored[0]), int(scored[-1])
        ids = torch.cat([batch["tokens"][row, :1], batch["labels"][row]]).tolist()  # the sample's tokens
        rows.append((ids[: first + 1], ids[first + 1 : last + 2]))
    (prompt, chosen), (rejected_prompt, rejected) = rows
    assert prompt == rejected_prompt
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def _trl(tiny_models, tuned, tmp_path, config: dict, ref_logps, batches) -> list[dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    base = tiny_models["llama"]
    reference = None if ref_logps is not None else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples = [_trl_example(batch) for batch in batches]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=1, **config)  # fmt: skip
    unused = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # batches are given directly
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=unused)  # fmt: skip
    trainer.model.train()
    found = []
    with torch.no_grad():
        for example in examples:
            inputs = trainer.data_collator([example])
            if ref_logps is not None:
                inputs["ref_chosen_logps"] = inputs["ref_rejected_logps"] = torch.tensor([ref_logps])
            loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
            logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
            found.append({"loss": float(loss), **{key: logged[key] for key in (
                "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")}})  # fmt: skip
    trainer.model.zero_grad()
    step_inputs = trainer.data_collator(examples[:STEP_PAIRS])
    if ref_logps is not None:
        step_inputs["ref_chosen_logps"] = step_inputs["ref_rejected_logps"] = torch.full((STEP_PAIRS,), ref_logps)
    trainer._compute_loss(trainer.model, step_inputs, return_outputs=False).backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                                      if p.grad is not None])).item()  # fmt: skip
    return found, grad_norm


# The default suite runs the weighted sum (sigmoid + ipo + hinge) and cDPO; every loss type alone under `slow`.
FAST = ("weighted", "cdpo")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_dpo_per_pair_values_equal_trl(tiny_models, tuned, tmp_path, case):
    rlhf, trl_config, ref_logps = CASES[case]
    ours, batches, grad_norm, _, validated = _ours(tiny_models, tuned, tmp_path, rlhf)
    theirs, trl_grad_norm = _trl(tiny_models, tuned, tmp_path, trl_config, ref_logps, batches)
    # The gradient of a step over several pairs (megatron-core's normalisation by the pair count): its norm.
    assert grad_norm == pytest.approx(trl_grad_norm, rel=1e-5), (grad_norm, trl_grad_norm)
    worst = {}
    for pair, (mine, trl) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["pairs"] == 1
        for key, expected in trl.items():
            worst[key] = max(worst.get(key, 0.0), abs(mine[key] - expected))
            # fp32 sums of per-token log-probs near -100 carry ulps of ~8e-6, and rewards / margins are differences
            # of such sums: each value is held to 1e-5, or 1e-6 of the pair's largest |logps| where that is more.
            tol = max(TOL, 1e-6 * max(abs(trl["logps/chosen"]), abs(trl["logps/rejected"])))
            assert mine[key] == pytest.approx(expected, abs=tol), (case, pair, key, mine[key], expected)
    # Validation: each pair counted once (fillers of the last global batch left out), the means of the per-pair values.
    for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"):
        if key == "loss" and "rpo_alpha" in rlhf:  # RPO's NLL is a token mean per global batch, not per pair
            continue
        expected = sum(pair[key] for pair in theirs[:VAL_PAIRS]) / VAL_PAIRS
        assert validated[f"val_{key}"] == pytest.approx(expected, rel=1e-6, abs=TOL), (key, validated, expected)
    # Not a trivial agreement: the policy differs from the reference, and the pairs from each other.
    rewards = [pair["rewards/margins"] for pair in theirs]
    assert max(abs(r) for r in rewards) > 1e-2 or case == "reference_free", rewards
    assert len({round(pair["loss"], 6) for pair in theirs}) > 1
    print(f"{case}: max abs diff vs TRL " + ", ".join(f"{key} {value:.1e}" for key, value in worst.items())
          + f"; grad norm {grad_norm:.6g} vs {trl_grad_norm:.6g}")  # fmt: skip


@pytest.mark.parametrize("task", ["dpo", pytest.param("orpo", marks=pytest.mark.slow)])
def test_packed_pairs_give_the_unpacked_per_pair_values(tiny_models, tuned, tmp_path, task):
    """Pairs packed into rows (data.packing: each side its own document) give the values of the same pairs unpacked:
    per-pair sums of the loss report, the reference's log-probs, and ORPO's whole-sequence NLL term."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.data.pairs import PairCollate
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, build_preference, check_job, check_weights

    rlhf = {"ref_model": str(tiny_models["llama"])} if task == "dpo" else {}
    data = {"seq_length": 256, "shuffle": False, "packing": True}
    job = job_for(str(tuned), DPO, str(tmp_path), {}, {"task": task, "global_batch_size": 1}, data=data, rlhf=rlhf)
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        preference = build_preference(job, args, chunks, check_weights(job, chunks, args))
        packed = build_train_data(job.data, AutoTokenizer.from_pretrained(tuned), task, 1, 0)
        rows = [row for row in packed.batches.items if len(row) >= 2][:2]  # rows of several whole pairs
        assert len(rows) == 2, [len(row) for row in packed.batches.items]
        collate = packed.batches.collate
        with torch.no_grad():
            (packed_report,) = preference.run(chunks, [collate(rows)], forward_only=True)
            pairs = [pair for row in rows for pair in row]
            (unpacked_report,) = preference.run(chunks, [PairCollate(256, 0)(pairs)], forward_only=True)
    finally:
        destroy_distributed()
    assert packed_report["dpo"][1] == len(pairs)
    assert packed_report["dpo"].tolist() == pytest.approx(unpacked_report["dpo"].tolist(), rel=1e-5, abs=1e-5)
