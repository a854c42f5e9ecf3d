"""Indexed pretraining data: the preprocess CLI writes what megatron-core's IndexedDataset reads, token for token."""

import numpy as np
import pytest

from megatron_swift.data import DataError, build_train_data
from megatron_swift.data.preprocess import main, preprocess
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import DataSection
from tests.data_helpers import write_jsonl

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}." * (1 + i % 3) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def test_cli_output_is_read_by_megatron_indexed_dataset(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer.save_pretrained(tmp_path / "tok")
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS])
    prefix = tmp_path / "out" / "corpus"
    assert main(["--input", str(source), "--output-prefix", str(prefix), "--tokenizer", str(tmp_path / "tok"),
                 "--workers", "2"]) == 0  # fmt: skip
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(TEXTS) and dataset.index.dtype == np.uint16  # megatron's choice for a small vocab
    for text, document in zip(TEXTS, (dataset[i] for i in range(len(dataset))), strict=True):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert document.tolist() == expected

    one_worker = tmp_path / "one"
    preprocess([str(source)], str(one_worker), tokenizer, workers=1)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / "out" / f"corpus{suffix}").read_bytes()


def test_bad_input_leaves_existing_output_untouched(tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS[:3]])
    preprocess([str(good)], str(tmp_path / "corpus"), tokenizer)
    before = (tmp_path / "corpus.bin").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": ["not", "a", "string"]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: text must be a string"):
        preprocess([str(bad)], str(tmp_path / "corpus"), tokenizer)
    assert (tmp_path / "corpus.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus.bin", "corpus.idx", "good.jsonl"]
    counts = preprocess([str(bad)], str(tmp_path / "skipped"), tokenizer, skip_bad_rows=True)
    assert counts["documents"] == 1 and counts["bad_rows"] == 1


def test_gpt_windows_over_indexed_data(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS])
    preprocess([str(source)], str(tmp_path / "corpus"), tokenizer)
    seq = 32
    data = build_train_data(
        DataSection(dataset=[str(tmp_path / "corpus")], seq_length=seq), tokenizer, "pretrain", 4, 5
    )
    windows = data.batches.items
    stream = np.concatenate([windows[i].ids[:-1] for i in range(len(windows))])
    documents = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]
    total = sum(map(len, documents))
    assert len(windows) == (total - 1) // seq and all(len(windows[i].ids) == seq + 1 for i in range(len(windows)))
    # The windows walk the documents in a seeded shuffled order, each document whole and ending with EOD.
    order, position = [], 0
    while position < len(stream) - 200:
        match = [i for i, d in enumerate(documents) if stream[position : position + len(d)].tolist() == d]
        order.append(match[0])
        position += len(documents[match[0]])
    assert order != sorted(order) and len(set(order)) == len(order)
    batch = data.batches.next_microbatches(0, 1, 4)[0]
    assert batch["tokens"].shape == (4, seq) and batch["loss_mask"].all()
