"""KTO data and config (train.task kto): labelled rows, the KL sequences (TRL's rotation), collation, bad rows,
preflight."""

import re

import pytest
import torch

from megatron_swift.data import DataError, build_train_data
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import preflight
from tests.data_helpers import preference_data, write_jsonl
from tests.train_matrix import job_for

KTO = "examples/data/kto_sample.jsonl"
QUESTION = {"role": "user", "content": "Capital of France?"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _row(question: str, answer: str, label) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "label": label}  # fmt: skip


def _split(batch: dict, row: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a row, as TRL's collator takes them: the completion is the scored span."""
    scored = batch["loss_mask"][row].nonzero().flatten()
    first, last = int(scored[0]), int(scored[-1])
    ids = torch.cat([batch["tokens"][row, :1], batch["labels"][row]]).tolist()
    return ids[: first + 1], ids[first + 1 : last + 2]


def test_kl_sequences_are_trls_rotation_within_each_global_batch(tokenizer, tmp_path):
    """Items in dataset order, cut into chunks of the global batch (5 items, batches of 2: the last chunk of one
    joins the one before); each KL row is the item's prompt with the previous completion of its chunk, exactly the
    sequence TRL's collator builds from TRL's `KL_completion_ids` ([c[-1]] + c[:-1] per batch)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [_row(f"Question {i}?", f"Answer number {i}.", i % 2 == 0) for i in range(5)]
    data = build_train_data(preference_data(write_jsonl(tmp_path / "k.jsonl", rows)), tokenizer, "kto", 2, 0)
    assert data.num_samples == 5 and data.stats["desirable"] == 3
    batch = data.batches.collate(list(data.batches.items))
    n = 5
    assert batch["tokens"].shape == (2 * n, 96) and batch["desirable"].tolist() == [1, 0, 1, 0, 1]
    prompts, completions = zip(*(_split(batch, row) for row in range(n)), strict=True)
    assert [tokenizer.decode(c).split("<")[0] for c in completions] == [f"Answer number {i}." for i in range(5)]
    chunks = [[0, 1], [2, 3, 4]]
    rotated = {i: chunk[(chunk.index(i) - 1) % len(chunk)] for chunk in chunks for i in chunk}
    examples = [{"prompt_ids": prompts[i], "completion_ids": completions[i],
                 "KL_completion_ids": completions[rotated[i]], "label": True} for i in range(n)]  # fmt: skip
    theirs = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    for i in range(n):
        length = int(theirs["KL_attention_mask"][i].sum())
        ours = torch.cat([batch["tokens"][n + i, :1], batch["labels"][n + i]])[:length]
        assert ours.tolist() == theirs["KL_input_ids"][i, :length].tolist(), i
        # Scored: TRL's KL completion mask (its labels are the next tokens: shifted by one).
        assert batch["loss_mask"][n + i, : length - 1].tolist() == theirs["KL_completion_mask"][i, 1:length].tolist()
        assert batch["loss_mask"][n + i, length - 1 :].sum() == 0


def test_labels_and_cache(tokenizer, tmp_path):
    options = {"cache_dir": str(tmp_path / "cache")}
    first = build_train_data(preference_data(KTO, **options), tokenizer, "kto", 4, 0)
    again = build_train_data(preference_data(KTO, **options), tokenizer, "kto", 4, 0)
    assert list((tmp_path / "cache").iterdir()) and first.stats == again.stats
    assert first.stats["desirable"] == 24 and first.num_samples == 48
    for a, b in zip(first.batches.next_microbatches(0, 1, 2), again.batches.next_microbatches(0, 1, 2), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert a["desirable"].tolist() == [1.0, 0.0]  # the shipped file alternates true / false
    labels = [True, False, 1, 0]
    path = write_jsonl(tmp_path / "l.jsonl", [_row(f"Q{i}", f"A{i}", label) for i, label in enumerate(labels)])
    (batch,) = build_train_data(preference_data(path), tokenizer, "kto", 4, 0).batches.next_microbatches(0, 1, 4)
    assert batch["desirable"].tolist() == [1.0, 0.0, 1.0, 0.0]


BAD = [
    ({"messages": [QUESTION, {"role": "assistant", "content": "Paris."}]}, "k.jsonl:2: KTO rows need 'label'"),
    (_row("Q", "A", "yes"), "k.jsonl:2: 'label' must be true or false, got 'yes'"),
    (_row("Q", "A", 2), "k.jsonl:2: 'label' must be true or false, got 2"),
    ({**_row("Q", "A", True), "rejected_response": "B"}, "k.jsonl:2: KTO rows are unpaired"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "a"}, QUESTION], "label": True},
     "k.jsonl:2: the conversation must end with the assistant's response"),
    ({"text": "plain", "label": True}, "k.jsonl:2: KTO rows need a conversation"),
    ({"messages": [{"role": "robot", "content": "x"}], "label": False}, "k.jsonl:2: messages[0] has unknown role"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_kto_rows_name_file_and_line(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "k.jsonl", [_row("Q", "A", True), row])
    with pytest.raises(DataError, match=re.escape(message)):
        build_train_data(preference_data(path), tokenizer, "kto", 2, 0)


PREFLIGHT = [
    ({"loss_type": ["sigmoid"]}, {}, {}, "rlhf.loss_type=['sigmoid']: train.task kto takes one of kto"),
    ({"loss_type": ["kto", "apo_zero_unpaired"]}, {}, {}, "rlhf.loss_type=['kto', 'apo_zero_unpaired']: train.task"),
    ({"desirable_weight": 0.0}, {}, {}, "rlhf.desirable_weight=0.0 must be > 0"),
    ({"undesirable_weight": -1.0}, {}, {}, "rlhf.undesirable_weight=-1.0 must be > 0"),
    ({"label_smoothing": 0.1}, {}, {}, "rlhf.label_smoothing: not used by train.task kto"),
    ({"reference_free": True}, {}, {}, "rlhf.reference_free: not used by train.task kto"),
    ({"loss_weights": [1.0]}, {}, {}, "rlhf.loss_weights: not used by train.task kto"),
    ({}, {"packing": True, "streaming": True}, {}, "data.streaming: preference data is read whole"),
    ({}, {}, {"global_batch_size": 1}, "train.global_batch_size: kto estimates its KL term"),
    ({"cpo_alpha": 1.0}, {}, {}, "rlhf.cpo_alpha: used by train.task simpo only"),
]  # fmt: skip


@pytest.mark.parametrize(("rlhf", "data", "train", "message"), PREFLIGHT)
def test_preflight_names_the_kto_field(tmp_path, rlhf, data, train, message):
    job = job_for("hf", KTO, str(tmp_path), {}, {"task": "kto", **train}, data=data, rlhf=rlhf)
    assert any(message in problem for problem in preflight(job, 1)), preflight(job, 1)


def test_preflight_accepts_kto_and_keeps_its_fields_off_other_tasks(tmp_path):
    for rlhf in ({}, {"loss_type": ["apo_zero_unpaired"]}, {"desirable_weight": 1.33, "beta": 0.5}):
        assert not preflight(job_for("hf", KTO, str(tmp_path), {}, {"task": "kto"}, rlhf=rlhf), 1)
    assert not preflight(job_for("hf", KTO, str(tmp_path), {}, {"task": "kto"}, data={"packing": True}), 1)
    assert not preflight(
        job_for(
            "hf",
            KTO,
            str(tmp_path),
            {},
            {"task": "kto", "global_batch_size": 1},
            rlhf={"loss_type": ["apo_zero_unpaired"]},
        ),
        1,
    )  # fmt: skip  no KL: one item is fine
    job = job_for("hf", KTO, str(tmp_path), {}, {"task": "dpo"}, rlhf={"undesirable_weight": 2.0})
    assert "rlhf.undesirable_weight: used by train.task kto only" in preflight(job, 1)
    job = job_for("hf", KTO, str(tmp_path), {}, {"task": "kto"}, lora={"modules_to_save": ["output_layer"]})
    assert any(p.startswith("lora.modules_to_save: the reference") for p in preflight(job, 1))


def test_the_kto_example_passes_preflight_at_its_layout():
    from megatron_swift.config import load_config
    from megatron_swift.training.config import JobConfig

    job = load_config(JobConfig, "examples/tiny_kto.yaml")
    assert job.train.task == "kto" and not preflight(job, 2), preflight(job, 2)
