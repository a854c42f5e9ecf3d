"""The minimal training data path: assistant-only loss masks, pretraining windows, bad rows with file:line."""

import json
import re

import pytest

from megatron_swift.data.simple import DataError, GlobalBatches, build_samples
from megatron_swift.models.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sft_mask_covers_exactly_the_assistant_replies(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    (sample,) = build_samples(_write(tmp_path / "d.jsonl", [{"messages": messages}]), tokenizer, 128, "sft")
    trained = tokenizer.decode(sample.tokens[sample.loss_mask.bool()])
    assert trained == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(sample.tokens[: len(tokenizer(full)["input_ids"])]) == full


def test_pretraining_windows_join_documents_with_eos(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"text": "the quick brown fox " * 5}] * 4)
    samples = build_samples(path, tokenizer, 16, "pretrain")
    assert samples and all(s.tokens.shape == (17,) and s.loss_mask.all() for s in samples)
    assert tokenizer.eos_token_id in set().union(*(set(s.tokens.tolist()) for s in samples))


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        (['{"messages": [}'], "sft", "d.jsonl:1: invalid JSON"),
        ([{"messages": [{"role": "user", "content": "hi"}]}, {"text": "x"}], "sft", "d.jsonl:1: no assistant turn"),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"text": "x"}],
         "sft", "d.jsonl:2: SFT rows need a 'messages' list"),
        ([{"messages": [{"role": "robot", "content": "a"}]}], "sft", "d.jsonl:1: messages[0] needs a role"),
        ([{"messages": [{"role": "assistant", "content": ["a"]}]}], "sft", "d.jsonl:1: messages[0].content must"),
        ([{"text": 3}], "pretrain", "d.jsonl:1: pretraining rows need a string field 'text'"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, rows, task, message):
    with pytest.raises(DataError, match=re.escape(message)):
        build_samples(_write(tmp_path / "d.jsonl", rows), tokenizer, 32, task)


def test_global_batches_split_the_same_samples_over_data_parallel_ranks(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"text": f"document number {i} " * 4} for i in range(12)])
    samples = build_samples(path, tokenizer, 8, "pretrain")
    single = GlobalBatches(samples, 4, seed=3).next_microbatches(0, 1, 1)
    halves = [GlobalBatches(samples, 4, seed=3).next_microbatches(rank, 2, 1) for rank in range(2)]
    assert [b["tokens"].tolist() for b in single] == [b["tokens"].tolist() for half in halves for b in half]
