"""Data pipeline: sources and formats, bad input with file:line, mixing and split, workers, cache, batches."""

import json
import re

import numpy as np
import pytest
import torch

from megatron_swift.data import DataError, build_train_data
from megatron_swift.data.encode import Encoder, encode_rows
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import Row
from megatron_swift.data.templates import make_template
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import DataSection
from tests.data_helpers import chat_conversations, write_jsonl

SFT = "examples/data/sft_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _data(*datasets, **options) -> DataSection:
    return DataSection(dataset=[str(d) for d in datasets], **{"seq_length": 96, **options})


def _first_batch_tokens(data) -> list:
    return [b["tokens"].tolist() for b in data.batches.next_microbatches(0, 1, 1)]


def test_every_chat_format_gives_the_same_tokens(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}]  # fmt: skip
    rows = {
        "messages": {"messages": messages},
        "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Capital of France?"},
                                                              {"from": "gpt", "value": "Paris."}]},
        "alpaca": {"system": "Be brief.", "instruction": "Capital", "input": "of France?", "output": "Paris."},
        "query_response": {"system": "Be brief.", "query": "Capital of France?", "response": "Paris."},
    }  # fmt: skip
    encoder = Encoder(tokenizer, make_template("tokenizer", tokenizer), LossPolicy())
    samples = {name: encoder.encode([Row("t:1", row)])[0] for name, row in rows.items()}
    expected = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    for name in ("messages", "sharegpt", "query_response"):
        assert samples[name].ids.tolist() == list(expected), name
    assert tokenizer.decode(samples["alpaca"].ids).count("Capital\nof France?") == 1


def test_file_types_and_datasets_dirs_read_the_same_rows(tokenizer, tmp_path):
    import datasets
    import pandas as pd

    rows = [{"query": f"question {i}", "response": f"answer {i}"} for i in range(6)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reference = _first_batch_tokens(build_train_data(_data(tmp_path / "d.jsonl"), tokenizer, "sft", 6, 0))
    for name in ("d.json", "d.parquet", "d.csv", "saved"):
        assert _first_batch_tokens(build_train_data(_data(tmp_path / name), tokenizer, "sft", 6, 0)) == reference


def test_mixing_counts_and_validation_split(tokenizer, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [{"query": f"s{i}", "response": "x"} for i in range(3)])
    big = write_jsonl(tmp_path / "big.jsonl", [{"query": f"b{i}", "response": "y"} for i in range(10)])
    data = build_train_data(_data(f"{small}#7", f"{big}#4", split_dataset_ratio=0.2), tokenizer, "sft", 2, 0)
    assert data.stats["rows"] == 11 and data.num_samples == 9 and len(data.validation) == 2
    again = build_train_data(_data(f"{small}#7", f"{big}#4", split_dataset_ratio=0.2), tokenizer, "sft", 2, 0)
    assert [s.ids.tolist() for s in again.validation] == [s.ids.tolist() for s in data.validation]


BAD = [
    ('{"messages": [}', "d.jsonl:2: invalid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:2: no assistant turn, so no token to train on"),
    ({"instruction": "a"}, "d.jsonl:2: cannot tell the row format"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "d.jsonl:2: messages[0] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
     "d.jsonl:2: messages[1].content must be a string, got list"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]},
     "d.jsonl:2: conversations[1].value must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{}]}]},
     "d.jsonl:2: messages[1].tool_calls[0] needs a function name"),
    ({"text": "plain text"}, "d.jsonl:2: SFT rows need a conversation"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}, row])
    with pytest.raises(DataError, match=re.escape(message)):
        build_train_data(_data(path), tokenizer, "sft", 1, 0)


def test_nothing_to_train_on_under_the_loss_policy_names_the_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}, {"query": "q", "response": "r"}])
    with pytest.raises(DataError, match=re.escape("d.jsonl:1: no token to train on")):
        build_train_data(_data(path, role_loss_scale=["assistant=0"]), tokenizer, "sft", 1, 0)


def test_skip_bad_rows_counts_them_and_the_cache_survives_bad_input(tokenizer, tmp_path):
    good = [{"query": f"q{i}", "response": f"r{i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", [*good, "{oops", {"messages": []}])
    cache = tmp_path / "cache"
    data = build_train_data(_data(path, skip_bad_rows=True, cache_dir=str(cache)), tokenizer, "sft", 2, 0)
    assert data.stats["bad_rows"] == 2 and data.num_samples == 4
    (entry,) = cache.glob("*.npz")
    before = entry.read_bytes()
    cached = build_train_data(_data(path, skip_bad_rows=True, cache_dir=str(cache)), tokenizer, "sft", 2, 0)
    assert cached.stats == data.stats and _first_batch_tokens(cached) == _first_batch_tokens(data)
    write_jsonl(path, [*good, "{oops"])  # changed input: a new key, then an error; the old entry is untouched
    with pytest.raises(DataError, match=re.escape("d.jsonl:5: invalid JSON")):
        build_train_data(_data(path, cache_dir=str(cache)), tokenizer, "sft", 2, 0)
    assert [p.name for p in cache.iterdir()] == [entry.name] and entry.read_bytes() == before


def test_workers_give_exactly_the_output_of_one(tokenizer):
    rows = [Row(f"t:{i}", row) for i, row in enumerate(chat_conversations() * 30)]
    encoder = Encoder(tokenizer, make_template("chatml", tokenizer), LossPolicy())
    one = [s for _, s in encode_rows(encoder, rows, workers=1, chunk_rows=50)]
    two = [s for _, s in encode_rows(encoder, rows, workers=2, chunk_rows=50)]
    assert len(one) == len(two) == len(rows)
    assert all(
        np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights) for a, b in zip(one, two, strict=True)
    )


def test_truncation_strategies_are_counted(tokenizer):
    base = dict(seq_length=48)
    kept = {s: build_train_data(_data(SFT, truncation_strategy=s, **base), tokenizer, "sft", 1, 0).stats
            for s in ("delete", "left", "right")}  # fmt: skip
    assert kept["delete"]["deleted_too_long"] > 0 and kept["delete"]["truncated"] == 0
    assert kept["right"]["truncated"] == kept["delete"]["deleted_too_long"]
    assert kept["left"]["trained_samples"] == kept["left"]["samples"]  # the answer is at the end: left keeps it
    assert kept["right"]["no_target_after_truncation"] > 0


@pytest.mark.parametrize("packing", [False, True])
def test_data_parallel_ranks_split_the_same_global_batch(tokenizer, packing):
    def batches(rank: int, size: int) -> list:
        data = build_train_data(_data(SFT, packing=packing), tokenizer, "sft", 4, 3)
        data.batches.consumed_samples = 4  # the second global batch, as after a resume
        return [{k: v.tolist() for k, v in b.items()} for b in data.batches.next_microbatches(rank, size, 1)]

    assert batches(0, 1) == batches(0, 2) + batches(1, 2)


def test_pretraining_windows_cover_the_documents_with_eos(tokenizer):
    data = build_train_data(_data("examples/data/pretrain_sample.jsonl", seq_length=16), tokenizer, "pretrain", 4, 0)
    batch = data.batches.next_microbatches(0, 1, 4)[0]
    assert batch["tokens"].shape == (4, 16) and batch["loss_mask"].all()
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    windows = data.batches.items
    assert windows[0].ids[-1] == windows[1].ids[0]  # Megatron's stride: a window's last token starts the next


def test_role_loss_scale_merges_with_the_tool_default(tokenizer):
    """`data.role_loss_scale` entries are multiplied in on top of `tool=0`: a user's `user=0.5` must not start
    training tool observations; only an explicit `tool=...` does."""
    from megatron_swift.data.pipeline import make_encoder

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "sunny and warm"},
                        {"role": "assistant", "content": "It is sunny."}]}  # fmt: skip

    def weights(*scales: str) -> tuple[np.ndarray, np.ndarray]:
        data = _data("unused.jsonl", template="qwen", loss_scale="all", role_loss_scale=list(scales))
        (sample,) = make_encoder(data, tokenizer, "sft").encode([Row("t:1", row)])
        return sample.ids, sample.weights

    ids, user_half = weights("user=0.5")
    _, explicit_zero = weights("user=0.5", "tool=0")
    _, tool_trained = weights("user=0.5", "tool=1")
    assert np.array_equal(user_half, explicit_zero)
    assert 0.5 in user_half and 0.0 in user_half
    changed = np.flatnonzero(tool_trained != user_half)
    assert len(changed) and np.all(user_half[changed] == 0) and np.all(tool_trained[changed] == 1)
    assert "sunny and warm" in tokenizer.decode(ids[changed])
