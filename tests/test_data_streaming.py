"""Streaming: lazily read, sharded over data-parallel ranks, resumed by skipping exactly the consumed samples."""

import itertools
import re

import pytest

from megatron_swift.config import ParallelConfig
from megatron_swift.data import build_train_data
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import DataSection, TrainSection, data_problems
from tests.data_helpers import write_jsonl

ROWS = 50


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "s.jsonl", [{"query": f"sample {i}", "response": f"id {i}"} for i in range(ROWS)])


def _stream(tokenizer, corpus, **options):
    data = DataSection(dataset=[str(corpus)], seq_length=32, streaming=True, shuffle_buffer=8, **options)
    return build_train_data(data, tokenizer, "sft", 4, 1).batches


def _ids(tokenizer, microbatches) -> list[int]:
    """The sample ids of micro-batches, read back from the trained tokens ("id N")."""
    found = []
    for batch in microbatches:
        for tokens, mask in zip(batch["labels"], batch["loss_mask"], strict=True):
            found.append(int(re.fullmatch(r"id (\d+)<\|im_end\|>\n", tokenizer.decode(tokens[mask > 0]))[1]))
    return found


def test_resume_skips_exactly_the_consumed_samples(tokenizer, corpus):
    straight = _stream(tokenizer, corpus)
    seen = [_ids(tokenizer, straight.next_microbatches(0, 1, 2)) for _ in range(20)]  # 80 samples: two epochs
    first_epoch = list(itertools.chain(*seen))[:ROWS]
    assert sorted(first_epoch) == list(range(ROWS)) and first_epoch != list(range(ROWS))  # each once, shuffled
    resumed = _stream(tokenizer, corpus)
    resumed.consumed_samples = 7 * 4  # as restored from a checkpoint after step 7
    assert [_ids(tokenizer, resumed.next_microbatches(0, 1, 2)) for _ in range(7, 20)] == seen[7:]


def test_data_parallel_ranks_take_their_slice_of_the_stream(tokenizer, corpus):
    single = _stream(tokenizer, corpus)
    ranks = [_stream(tokenizer, corpus) for _ in range(2)]
    for _ in range(3):
        whole = _ids(tokenizer, single.next_microbatches(0, 1, 1))
        assert whole == list(
            itertools.chain(*(_ids(tokenizer, r.next_microbatches(i, 2, 1)) for i, r in enumerate(ranks)))
        )


def test_streaming_preflight_refuses_what_a_stream_cannot_do():
    data = DataSection(dataset=["a.jsonl#3"], streaming=True, truncation_strategy="delete", packing=True)
    problems = "\n".join(data_problems(data, TrainSection(epochs=1.0), ParallelConfig()))
    for field in ("data.truncation_strategy=delete", "data.packing", "data.dataset", "data.streaming"):
        assert field in problems
