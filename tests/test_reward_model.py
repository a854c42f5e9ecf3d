"""Reward models (train.task rm) against TRL's RewardTrainer and HF's *ForSequenceClassification: the same weights
(an HF LlamaForSequenceClassification with its `score` head), the same pairs, fp32.

Our numbers come from the training path itself (the pairs' micro-batches from the data pipeline, the per-pair report
of the loss function, a step's grad norm); TRL's from `RewardTrainer.compute_loss` on the same token ids, one pair per
call (its loss is then that pair's loss), the rewards from the model outputs it returns, and its logged metrics.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.train_matrix import job_for

DPO = "examples/data/dpo_sample.jsonl"
PAIRS = 8
STEP_PAIRS = 4
VAL_PAIRS = 6
TOL = 1e-5
CENTER = 0.05


@pytest.fixture(scope="module")
def reward_hf(tiny_models, tmp_path_factory):
    """The tiny Llama as an HF reward model: HF's own head (initialised by transformers), saved as HF saves it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("reward_hf")
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    return out


@pytest.fixture(scope="module")
def margin_pairs(tmp_path_factory):
    """The sample pairs with a `margin` on every other row (TRL's per-row margin)."""
    from pathlib import Path

    rows = [json.loads(line) for line in Path(DPO).read_text().splitlines()][:PAIRS]
    for index, row in enumerate(rows):
        if index % 2:
            row["margin"] = 0.25 * index
    path = tmp_path_factory.mktemp("margins") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, [row.get("margin", 0.0) for row in rows]


def _ours(model_dir, data_path, tmp_path, rlhf: dict):
    """Per pair: the report of our loss function (world of size 1); the micro-batches; a step's grad norm over the
    first STEP_PAIRS pairs; the validation metrics over the first VAL_PAIRS pairs."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.evaluate import validation_microbatches
    from megatron_swift.training.job import build_model, build_preference, check_job, check_weights
    from megatron_swift.training.optim import wrap_for_training
    from megatron_swift.training.reward import REPORT

    job = job_for(str(model_dir), str(data_path), str(tmp_path), {}, {"task": "rm", "global_batch_size": 1},
                  data={"seq_length": 64, "shuffle": False}, rlhf=rlhf)  # fmt: skip
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        reward = build_preference(job, args, chunks, check_weights(job, chunks, args))
        data = build_train_data(job.data, AutoTokenizer.from_pretrained(model_dir), "rm", 1, 0)
        found, batches = [], []
        with torch.no_grad():
            for _ in range(PAIRS):
                (microbatch,) = data.batches.next_microbatches(0, 1, 1)
                batches.append({key: value.clone() for key, value in microbatch.items()})
                (report,) = reward.run(chunks, [microbatch], forward_only=True)
                found.append(dict(zip(REPORT, report["rm"].tolist(), strict=True)))
        items = [data.batches.items[i] for i in range(VAL_PAIRS)]  # global batches of 4: the last with 2 fillers
        validated = reward.validate(chunks, validation_microbatches(items, data.batches.collate, 4, 1, 0, 1))
        chunks, optimizer, scheduler = wrap_for_training(chunks, job)
        step = [{key: value.clone() for key, value in batch.items()} for batch in batches[:STEP_PAIRS]]
        grad_norm = reward.train_step(chunks, optimizer, scheduler, step, args.vocab_size).grad_norm
    finally:
        destroy_distributed()
    return found, batches, grad_norm, validated


def _sample_ids(batch: dict, row: int) -> list[int]:
    """The whole sample of a row of an rm micro-batch (its tokens up to the reward position)."""
    return batch["tokens"][row, : int(batch["reward_position"][row]) + 1].tolist()


def _trl(model_dir, tmp_path, batches, margins, center):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                        per_device_train_batch_size=1, center_rewards_coefficient=center)  # fmt: skip
    unused = Dataset.from_list([{"chosen": "a", "rejected": "b"}])  # batches are given directly
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=unused)
    trainer.model.train()
    examples = [{"chosen_ids": _sample_ids(b, 0), "rejected_ids": _sample_ids(b, 1), "margin": m}
                for b, m in zip(batches, margins, strict=True)]  # fmt: skip
    found = []
    with torch.no_grad():
        for example in examples:
            loss, outputs = trainer.compute_loss(trainer.model, trainer.data_collator([example]), return_outputs=True)
            chosen, rejected = outputs.logits.squeeze(-1).tolist()
            logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
            found.append({"loss": float(loss), "rewards/chosen": chosen, "rewards/rejected": rejected,
                          "rewards/margins": logged["margin"], "rewards/accuracies": logged["accuracy"]})  # fmt: skip
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, trainer.data_collator(examples[:STEP_PAIRS])).backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                                      if p.grad is not None])).item()  # fmt: skip
    return found, grad_norm


def test_reward_model_per_pair_values_equal_trl(reward_hf, margin_pairs, tmp_path):
    data_path, margins = margin_pairs
    ours, batches, grad_norm, validated = _ours(reward_hf, data_path, tmp_path, {"center_rewards_coefficient": CENTER})
    theirs, trl_grad_norm = _trl(reward_hf, tmp_path, batches, margins, CENTER)
    assert grad_norm == pytest.approx(trl_grad_norm, rel=1e-5), (grad_norm, trl_grad_norm)
    worst = {}
    for pair, (mine, trl) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["pairs"] == 1
        for key, expected in trl.items():
            worst[key] = max(worst.get(key, 0.0), abs(mine[key] - expected))
            assert mine[key] == pytest.approx(expected, abs=TOL), (pair, key, mine[key], expected)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        expected = sum(pair[key] for pair in theirs[:VAL_PAIRS]) / VAL_PAIRS
        assert validated[f"val_{key}"] == pytest.approx(expected, abs=TOL), (key, validated, expected)
    # Not a trivial agreement: rewards differ between pairs and sides, the margins and the centering term count.
    assert len({round(pair["rewards/chosen"], 6) for pair in theirs}) == PAIRS
    assert {pair["rewards/accuracies"] for pair in theirs} == {0.0, 1.0}
    print("rm: max abs diff vs TRL " + ", ".join(f"{key} {value:.1e}" for key, value in worst.items())
          + f"; grad norm {grad_norm:.6g} vs {trl_grad_norm:.6g}")  # fmt: skip


def test_rm_micro_batches_hold_whole_samples_with_their_reward_positions_and_margins(tmp_path):
    from megatron_swift.data import build_train_data
    from megatron_swift.models.tiny import make_tiny_tokenizer
    from tests.data_helpers import preference_data, write_jsonl

    tokenizer = make_tiny_tokenizer()
    question = {"role": "user", "content": "Capital of France?"}
    rows = [{"messages": [question, {"role": "assistant", "content": "Paris."}], "rejected_response": "Lyon, I think.",
             "margin": 1.5}, {"messages": [question, {"role": "assistant", "content": "Paris!"}],
             "rejected_response": "Nice."}]  # fmt: skip
    data = build_train_data(preference_data(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, "rm", 2, 0)
    (batch,) = data.batches.next_microbatches(0, 1, 2)
    assert batch["margin"].tolist() == [1.5, 0.0]
    pairs = data.batches.items[:2]
    for row, sample in enumerate([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]):
        # The whole sample is the row's input (its last token too), and the reward is read at that last token.
        assert batch["tokens"][row, : len(sample.ids)].tolist() == sample.ids.tolist()
        assert int(batch["reward_position"][row]) == len(sample.ids) - 1
    # rm reads the last token: a sample is at most seq_length tokens (one more than SFT's window of inputs).
    fitted = build_train_data(preference_data(DPO, seq_length=24), tokenizer, "rm", 1, 0)
    assert max(len(side.ids) for pair in fitted.batches.items for side in (pair.chosen, pair.rejected)) <= 24


@pytest.mark.parametrize("margin", ["1.0", True, None])
def test_a_bad_margin_names_file_and_line(tmp_path, margin):
    from megatron_swift.data import DataError, build_train_data
    from megatron_swift.models.tiny import make_tiny_tokenizer
    from tests.data_helpers import preference_data, write_jsonl

    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            "rejected_response": "Go away."}  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", [good, {**good, "margin": margin}])
    with pytest.raises(DataError, match=re.escape(f"p.jsonl:2: 'margin' must be a number, got {margin!r}")):
        build_train_data(preference_data(path), make_tiny_tokenizer(), "rm", 1, 0)


PREFLIGHT = [
    ({"lora": {"adapter": "peft_dir"}}, "lora.adapter: starting a reward model from a PEFT adapter is not built"),
    ({"data": {"seq_length": 32, "max_length": 33}}, "data.max_length=33: train.task rm reads the reward at"),
    ({"rlhf": {"beta": 0.5}}, "rlhf.beta: not used by train.task rm"),
    ({"rlhf": {"loss_type": ["ipo"]}}, "rlhf.loss_type: not used by train.task rm"),
    ({"parallel": {"context_parallel_size": 2}}, "parallel.context_parallel_size: preference training needs 1"),
    ({"model": {"fused_linear_cross_entropy": True}}, "model.fused_linear_cross_entropy: preference training"),
]


@pytest.mark.parametrize(("options", "message"), PREFLIGHT)
def test_preflight_names_what_rm_does_not_build(tmp_path, options, message):
    from megatron_swift.training.config import preflight

    job = job_for("hf", DPO, str(tmp_path), options.get("parallel", {}), {"task": "rm"}, lora=options.get("lora"),
                  data=options.get("data"), rlhf=options.get("rlhf"), **options.get("model", {}))  # fmt: skip
    assert any(problem.startswith(message) for problem in preflight(job, 2)), preflight(job, 2)
    assert not preflight(
        job_for("hf", DPO, str(tmp_path), {}, {"task": "rm"}, rlhf={"center_rewards_coefficient": 0.1}), 1
    )
    dpo = job_for("hf", DPO, str(tmp_path), {}, {"task": "dpo"}, rlhf={"center_rewards_coefficient": 0.1})
    assert "rlhf.center_rewards_coefficient: used by train.task rm only" in preflight(dpo, 1)


def test_the_rm_example_passes_preflight_at_its_layout():
    from megatron_swift.config import load_config
    from megatron_swift.training.config import JobConfig, preflight

    job = load_config(JobConfig, "examples/tiny_rm.yaml")
    assert job.train.task == "rm" and job.train.train_type == "lora", job.train
    assert job.parallel.tensor_model_parallel_size == 2 and not preflight(job, 2), preflight(job, 2)
    assert preflight(job, 3)  # the check has teeth: 3 processes do not fit its layout


def test_a_reward_model_checkpoint_trains_only_as_a_reward_model(reward_hf, tmp_path):
    from megatron_swift.config import ConfigError
    from megatron_swift.training.job import check_job

    job = job_for(str(reward_hf), DPO, str(tmp_path), {}, {"task": "sft"})
    message = "model.hf: a LlamaForSequenceClassification checkpoint (a reward model) trains with train.task rm"
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_job(job, 1)
    assert check_job(job_for(str(reward_hf), DPO, str(tmp_path), {}, {"task": "rm"}), 1).reward_head


def test_a_trained_reward_model_exports_as_an_hf_sequence_classifier(tiny_models, tmp_path):
    """Trained a step from the causal LM (its head initialised), saved, exported by `mswift-convert mcore-to-hf`:
    transformers loads an AutoModelForSequenceClassification whose rewards equal ours (the checkpoint loaded with
    model.load) within 1e-5."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from converters.__main__ import main
    from megatron_swift.data import build_train_data
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from tests.train_matrix import losses_for_cases

    # A causal LM whose config.json has no pad_token_id (as Llama 3's): the export's comes from the run's tokenizer.
    llama, run = tmp_path / "llama", tmp_path / "run"
    shutil.copytree(tiny_models["llama"], llama)
    config = json.loads((llama / "config.json").read_text())
    del config["pad_token_id"]
    (llama / "config.json").write_text(json.dumps(config))
    train = {"task": "rm", "train_iters": 1, "lr": 5e-3}
    case = (
        str(llama),
        {},
        train,
        None,
        {},
        {"save": str(run / "ckpt"), "output_dir": str(run)},
        None,
        {"seq_length": 64},
    )
    losses_for_cases([case], DPO, str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(llama)
    job = job_for(None, DPO, str(tmp_path / "ours"), {}, {"task": "rm"}, data={"seq_length": 64, "shuffle": False},
                  load=str(run / "ckpt"))  # fmt: skip
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        (chunk,) = build_model(job, args)
        chunk.eval()
        data = build_train_data(job.data, tokenizer, "rm", 8, 0)
        (batch,) = data.batches.next_microbatches(0, 1, 8)  # 8 pairs: 16 rows
        tokens = batch["tokens"]
        with torch.no_grad():
            scores = chunk(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        ours = scores[torch.arange(len(tokens)), batch["reward_position"]]
        head = chunk.score.weight.detach().clone()
    finally:
        destroy_distributed()
    assert main(["mcore-to-hf", "--mcore", str(run / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == tokenizer.pad_token_id
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                     output_loading_info=True)  # fmt: skip
    assert model.num_labels == 1 and not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        theirs = model(
            input_ids=tokens, attention_mask=(torch.arange(tokens.shape[1]) <= batch["reward_position"][:, None]).long()
        ).logits.squeeze(-1)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, (ours, theirs)
    # Not a trivial agreement: the head was trained away from its seeded initialisation, and the rewards differ.
    initial = torch.empty(head.shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(job.train.seed))
    assert torch.equal(model.score.weight, head) and not torch.allclose(head, initial, atol=1e-4)
    assert len({round(value, 5) for value in theirs.tolist()}) == len(tokens)
    print(f"rm export: max abs diff of {len(tokens)} rewards vs transformers {diff:.1e}")


@pytest.mark.slow
def test_reward_model_layouts_match_the_single_process(tiny_models, reward_hf, tmp_path):
    """3 steps with validation at TP2, TP2 + SP, PP2 and DP2 (Llama, head initialised from train.seed; full and LoRA),
    PP2 from the HF reward model (head loaded) and PP2 of tied-embedding Qwen2 equal the single process within 1e-5:
    one launch per world size. Full and LoRA runs stopped after 2 steps and resumed equal the straight runs."""
    from tests.test_preference_parallel import (
        LAYOUTS,
        LORA,
        PACKED,
        RM_METRICS,
        _assert_same,
        _metrics,
        _resumed,
        _rm_case,
    )
    from tests.train_matrix import run_cases

    models = {"llama": tiny_models["llama"], "reward_hf": reward_hf, "qwen2": tiny_models["qwen2"]}
    single = [_rm_case(path, {}) for path in models.values()] + [_rm_case(models["llama"], {}, lora=LORA)]
    single.append(_rm_case(models["llama"], {}, data=PACKED))  # case 4: packed
    single += [_rm_case(models["llama"], {}, train, lora, _resumed(tmp_path / name))  # 2 steps saved, then 3
               for name, lora in (("full", None), ("lora", LORA)) for train in ({"train_iters": 2}, {})]  # fmt: skip
    run_cases(single, DPO, tmp_path / "one", world_size=1)
    expected = {name: _metrics(tmp_path / "one" / f"case{i}") for i, name in enumerate([*models, "lora", "packed"])}
    for name, steps in expected.items():  # it learns the preference (packed: each step's pairs are others)
        assert steps[-1]["loss"] < steps[0]["loss"] or name == "packed", name
    for name, straight in (("full", expected["llama"]), ("lora", expected["lora"])):
        resumed = _metrics(tmp_path / name)
        assert [step["step"] for step in resumed] == [1, 2, 3], name
        compared = [key for key in straight[-1] if key in RM_METRICS or key.startswith("val_")]
        assert {k: resumed[-1][k] for k in compared} == {k: straight[-1][k] for k in compared}, name
    names = [(train, layout) for train in ("llama", "lora") for layout in LAYOUTS]
    names += [("reward_hf", "pp2"), ("qwen2", "pp2")]
    cases = [_rm_case(models.get(name, models["llama"]), LAYOUTS[layout], lora=LORA if name == "lora" else None)
             for name, layout in names]  # fmt: skip
    packed_layouts = ("tp2_sp", "pp2", "dp2")
    names += [("packed", layout) for layout in packed_layouts]
    cases += [_rm_case(models["llama"], LAYOUTS[layout], data=PACKED) for layout in packed_layouts]
    run_cases(cases, DPO, tmp_path / "two", 2)
    for index, (name, layout) in enumerate(names):
        got = _metrics(tmp_path / "two" / f"case{index}")
        _assert_same(got, expected[name], 1e-5, (name, layout), metrics=RM_METRICS)


def test_a_lora_reward_model_trains_its_head_and_exports_as_a_peft_seq_cls_adapter(tiny_models, tmp_path):
    """LoRA on a reward model started from the causal LM: the head trains in full next to the adapters (PEFT's
    SEQ_CLS). The adapter export (`modules_to_save: [score]`, task_type SEQ_CLS) loaded by PEFT on the HF base gives the
    rewards of the merged export loaded by transformers, and of our run's final validation, within 1e-4."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from converters.__main__ import main
    from megatron_swift.data import build_train_data
    from tests.test_preference_parallel import _metrics
    from tests.train_matrix import losses_for_cases

    llama, run = tiny_models["llama"], tmp_path / "run"
    data = {"seq_length": 64, "val_dataset": [f"{DPO}#10"]}
    case = (str(llama), {}, {"task": "rm", "train_iters": 1, "lr": 5e-3}, {"rank": 4, "alpha": 8}, {},
            {"save": str(run / "ckpt"), "output_dir": str(run)}, None, data)  # fmt: skip
    losses_for_cases([case], DPO, str(tmp_path))
    final = _metrics(run)[-1]
    ckpt = str(run / "ckpt")
    assert main(["mcore-to-hf", "--mcore", ckpt, "--out", str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert main(["mcore-to-hf", "--mcore", ckpt, "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    tokenizer = AutoTokenizer.from_pretrained(llama)
    base = AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1, dtype=torch.float32,
                                                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    job = job_for(str(llama), DPO, str(tmp_path), {}, {"task": "rm"}, data=data)
    validation = build_train_data(job.data, tokenizer, "rm", 4, job.train.seed)  # the run's validation pairs
    batch = validation.eval_collate(list(validation.eval_items))
    tokens = batch["tokens"]
    attention = (torch.arange(tokens.shape[1]) <= batch["reward_position"][:, None]).long()
    with torch.no_grad():
        by_peft = peft_model(input_ids=tokens, attention_mask=attention).logits.squeeze(-1)
        by_merge = merged(input_ids=tokens, attention_mask=attention).logits.squeeze(-1)
    assert (by_peft - by_merge).abs().max() <= 1e-4, (by_peft, by_merge)
    chosen, rejected = by_peft.double().chunk(2)
    assert final["val_rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert final["val_rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-4)
    # The head trained (it is not the initial draw), and the adapters did (the base model's head alone differs).
    initial = torch.empty(1, 64).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(job.train.seed))
    assert not torch.allclose(merged.score.weight, initial, atol=1e-4)
    base_only = AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1, dtype=torch.float32,
                                                                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    base_only.score.weight.data.copy_(merged.score.weight)
    with torch.no_grad():
        without_adapters = base_only(input_ids=tokens, attention_mask=attention).logits.squeeze(-1)
    assert (without_adapters - by_merge).abs().max() > 1e-3
    print(
        f"rm LoRA: PEFT vs merged max abs diff {(by_peft - by_merge).abs().max():.1e}; val rewards vs ours "
        f"{abs(final['val_rewards/chosen'] - float(chosen.mean())):.1e}"
    )


def test_a_reward_model_from_a_causal_lm_draws_its_head_from_train_seed(tiny_models, tmp_path):
    """HF's initialisation of `score` (normal(0, initializer_range)) drawn from train.seed alone: the same at every
    layout and on every rank, whatever else consumed the global RNG before."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job

    heads = {}
    for seed in (7, 8):
        job = job_for(str(tiny_models["llama"]), DPO, str(tmp_path), {}, {"task": "rm", "seed": seed})
        args = check_job(job, 1)
        init_distributed(job.parallel, seed=job.train.seed)
        try:
            torch.manual_seed(seed + 100)  # the global RNG is not the head's
            (chunk,) = build_model(job, args)
            heads[seed] = chunk.score.weight.detach().clone()
        finally:
            destroy_distributed()
    std = args.transformer["init_method_std"]
    assert std == 0.02  # the tiny config's initializer_range
    for seed, head in heads.items():
        expected = torch.empty(1, 64).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(head, expected), seed
    assert not torch.equal(heads[7], heads[8])


def test_packed_pairs_give_the_unpacked_rewards(reward_hf, tmp_path):
    """Reward-model pairs packed into rows (data.packing: each side's whole sample its own document, attention and
    rotary positions restarting at each) give the report of the same pairs unpacked."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.data.pairs import RewardPairCollate
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, build_preference, check_job, check_weights

    data = {"seq_length": 256, "shuffle": False, "packing": True}
    job = job_for(str(reward_hf), DPO, str(tmp_path), {}, {"task": "rm", "global_batch_size": 1}, data=data)
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        reward = build_preference(job, args, chunks, check_weights(job, chunks, args))
        tokenizer = AutoTokenizer.from_pretrained(reward_hf)
        packed = build_train_data(job.data, tokenizer, "rm", 1, 0)
        rows = [row for row in packed.batches.items if len(row) >= 2][:2]  # rows of several whole pairs
        assert len(rows) == 2, [len(row) for row in packed.batches.items]
        with torch.no_grad():
            (packed_report,) = reward.run(chunks, [packed.batches.collate(rows)], forward_only=True)
            pairs = [pair for row in rows for pair in row]
            unpacked = RewardPairCollate(256, tokenizer.pad_token_id)(pairs)
            (unpacked_report,) = reward.run(chunks, [unpacked], forward_only=True)
    finally:
        destroy_distributed()
    assert packed_report["rm"][1] == len(pairs)
    assert packed_report["rm"].tolist() == pytest.approx(unpacked_report["rm"].tolist(), rel=1e-5, abs=1e-6)
