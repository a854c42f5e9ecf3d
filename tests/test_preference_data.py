"""Preference data and config (train.task dpo): pair rows, loss masks, collation, bad rows, preflight."""

import re

import pytest
import torch

from megatron_swift.config import ConfigError
from megatron_swift.data import DataError, build_train_data
from megatron_swift.data.encode import Encoder
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import Row
from megatron_swift.data.templates import make_template
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import preflight
from tests.data_helpers import preference_data, write_jsonl
from tests.train_matrix import job_for

DPO = "examples/data/dpo_sample.jsonl"
QUESTION = {"role": "user", "content": "Capital of France?"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _scored_text(tokenizer, tokens, labels, mask) -> str:
    return tokenizer.decode(labels[mask > 0].tolist())


def test_a_micro_batch_holds_its_pairs_chosen_rows_first_and_scores_only_the_response(tokenizer, tmp_path):
    rows = [
        {"messages": [QUESTION, {"role": "assistant", "content": "Paris."}], "rejected_response": "Lyon."},
        {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
         "rejected_messages": [{"role": "user", "content": "Capital of Peru?"},
                               {"role": "assistant", "content": "Cusco, I think."}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = build_train_data(preference_data(path), tokenizer, "dpo", 2, 0)
    (batch,) = data.batches.next_microbatches(0, 1, 2)
    assert batch["tokens"].shape == (4, 96)  # 2 pairs -> 2 chosen rows, then their 2 rejected rows
    scored = [_scored_text(tokenizer, *(batch[k][i] for k in ("tokens", "labels", "loss_mask"))) for i in range(4)]
    assert [s.split("<")[0].strip() for s in scored] == ["Paris.", "Lima.", "Lyon.", "Cusco, I think."]
    assert set(batch["loss_mask"].unique().tolist()) == {0.0, 1.0}
    # The same template as SFT: each side is exactly what the SFT encoder makes of that conversation.
    encoder = Encoder(tokenizer, make_template("auto", tokenizer), LossPolicy("last_round"))
    rejected = encoder.encode([Row("t:1", {"messages": [QUESTION, {"role": "assistant", "content": "Lyon."}]})])[0]
    assert batch["tokens"][2, : len(rejected.ids) - 1].tolist() == rejected.ids[:-1].tolist()
    assert batch["loss_mask"][2, : len(rejected.ids) - 1].tolist() == rejected.weights[1:].tolist()


def test_multi_turn_pairs_score_the_last_response_only(tokenizer, tmp_path):
    history = [QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Peru?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [*history, {"role": "assistant", "content": "Lima."}],
                                               "rejected_response": "Cusco."}])  # fmt: skip
    (batch,) = build_train_data(preference_data(path), tokenizer, "dpo", 1, 0).batches.next_microbatches(0, 1, 1)
    scored = [_scored_text(tokenizer, batch["tokens"][i], batch["labels"][i], batch["loss_mask"][i]) for i in (0, 1)]
    assert "Paris" not in scored[0] and "Lima." in scored[0] and "Cusco." in scored[1]


BAD = [
    ({"messages": [QUESTION, {"role": "assistant", "content": "Paris."}]}, "p.jsonl:2: preference rows need exactly "
     "one of 'rejected_response' (a string) or 'rejected_messages'"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}], "rejected_response": "b",
      "rejected_messages": [QUESTION, {"role": "assistant", "content": "c"}]}, "p.jsonl:2: preference rows need"),
    ({"messages": [QUESTION], "rejected_response": "b"}, "p.jsonl:2: no assistant turn"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}, QUESTION], "rejected_response": "b"},
     "p.jsonl:2: the chosen conversation must end with the assistant's response"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}], "rejected_response": 3},
     "p.jsonl:2: rejected_response must be a string, got int"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}],
      "rejected_messages": [QUESTION, {"role": "assistant", "content": "b"}, QUESTION]},
     "p.jsonl:2: rejected_messages must end with the rejected assistant response"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}],
      "rejected_messages": [{"role": "robot", "content": "x"}]},
     "p.jsonl:2: rejected_messages: messages[0] has unknown role"),
    ({"text": "plain", "rejected_response": "b"}, "p.jsonl:2: preference rows need a conversation"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_pair_rows_name_file_and_line(tokenizer, tmp_path, row, message):
    good = {"messages": [QUESTION, {"role": "assistant", "content": "Paris."}], "rejected_response": "Lyon."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError, match=re.escape(message)):
        build_train_data(preference_data(path), tokenizer, "dpo", 1, 0)


def test_cached_pairs_are_the_pairs(tokenizer, tmp_path):
    options = {"cache_dir": str(tmp_path / "cache")}
    first = build_train_data(preference_data(DPO, **options), tokenizer, "dpo", 4, 0).batches.next_microbatches(0, 1, 2)
    again = build_train_data(preference_data(DPO, **options), tokenizer, "dpo", 4, 0).batches.next_microbatches(0, 1, 2)
    assert list((tmp_path / "cache").iterdir())
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_truncation_drops_pairs_left_without_a_scored_token(tokenizer, tmp_path):
    data = build_train_data(preference_data(DPO, seq_length=24), tokenizer, "dpo", 1, 0)
    assert data.stats["no_target_after_truncation"] > 0 and data.num_samples < 24
    for index in range(data.num_samples):
        (batch,) = data.batches.next_microbatches(0, 1, 1)
        assert (batch["loss_mask"].sum(dim=1) > 0).all(), index


PREFLIGHT = [
    ({"beta": 0.0}, {}, {}, "rlhf.beta=0.0 must be > 0"),
    ({"loss_type": ["sigmoid", "kto_pair"]}, {}, {}, "rlhf.loss_type=['sigmoid', 'kto_pair']: choose one or more"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, {}, {}, "rlhf.loss_weights=[1.0]: one weight per"),
    ({"label_smoothing": 0.5}, {}, {}, "rlhf.label_smoothing=0.5 must be in [0, 0.5)"),
    ({"label_smoothing": 0.1, "loss_type": ["hinge"]}, {}, {}, "rlhf.label_smoothing: used by loss_type sigmoid"),
    ({"rpo_alpha": -1.0}, {}, {}, "rlhf.rpo_alpha=-1.0 must be >= 0"),
    ({"reference_free": True, "ref_model": "x"}, {}, {}, "rlhf.reference_free: a reference-free run has no reference"),
    ({}, {"streaming": True}, {}, "data.streaming: preference data is read whole"),
    ({}, {}, {"context_parallel_size": 2}, "parallel.context_parallel_size: preference training needs 1"),
    ({"simpo_gamma": 1.0}, {}, {}, "rlhf.simpo_gamma: used by train.task simpo only"),
    ({"cpo_alpha": -0.5}, {}, {}, "rlhf.cpo_alpha: used by train.task simpo only"),
]  # fmt: skip
TASK_PREFLIGHT = [
    ("simpo", {"cpo_alpha": -0.5}, "rlhf.cpo_alpha=-0.5 must be >= 0"),
    ("simpo", {"ref_model": "x"}, "rlhf.ref_model: used by train.task dpo only (simpo has no reference"),
    ("orpo", {"loss_type": ["ipo"]}, "rlhf.loss_type: used by train.task dpo only (orpo has no reference"),
    ("orpo", {"rpo_alpha": 1.0}, "rlhf.rpo_alpha: used by train.task dpo only"),
    ("orpo", {"label_smoothing": 0.1}, "rlhf.label_smoothing: not used by train.task orpo"),
    ("orpo", {"simpo_gamma": 1.0}, "rlhf.simpo_gamma: used by train.task simpo only"),
]


@pytest.mark.parametrize(("task", "rlhf", "message"), TASK_PREFLIGHT)
def test_preflight_names_simpo_and_orpo_fields(tmp_path, task, rlhf, message):
    job = job_for("hf", DPO, str(tmp_path), {}, {"task": task}, rlhf=rlhf)
    assert any(message in problem for problem in preflight(job, 1)), preflight(job, 1)
    assert not preflight(job_for("hf", DPO, str(tmp_path), {}, {"task": task}), 1)


@pytest.mark.parametrize(("rlhf", "data", "parallel", "message"), PREFLIGHT)
def test_preflight_names_the_preference_field(tmp_path, rlhf, data, parallel, message):
    job = job_for("hf", DPO, str(tmp_path), parallel, {"task": "dpo"}, data=data, rlhf=rlhf)
    assert any(message in problem for problem in preflight(job, 2)), preflight(job, 2)


def test_preflight_refuses_modules_to_save_with_the_adapters_off_reference(tmp_path):
    job = job_for("hf", DPO, str(tmp_path), {}, {"task": "dpo"}, lora={"modules_to_save": ["output_layer"]})
    assert any(p.startswith("lora.modules_to_save: the reference") for p in preflight(job, 1))


def test_a_task_not_built_is_refused_naming_the_field():
    from megatron_swift.config import load_config
    from megatron_swift.training.config import JobConfig

    with pytest.raises(ConfigError, match=re.escape("train.task: 'grpo' is not one of ['pretrain', 'sft', 'dpo',")):
        load_config(JobConfig, None, ["--train.task", "grpo"])


def test_a_reference_model_of_another_architecture_is_refused(tiny_models, tmp_path):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models["llama"]), DPO, str(tmp_path), {}, {"task": "dpo"},
                  rlhf={"ref_model": str(tiny_models["qwen2"])})  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(f"rlhf.ref_model={tiny_models['qwen2']}: not the policy")):
        check_job(job, 1)


def test_preference_training_of_a_moe_model_is_refused(tiny_models, tmp_path):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models["mixtral"]), DPO, str(tmp_path), {}, {"task": "dpo"})
    with pytest.raises(ConfigError, match=re.escape("train.task=dpo: preference training of MoE models is not built")):
        check_job(job, 1)
