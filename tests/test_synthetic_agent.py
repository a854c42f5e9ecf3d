"""The agent example's data (megatron_swift/data/synthetic_agent.py): what the eval reads, what training encodes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_swift.data import synthetic_agent as sa
from megatron_swift.eval.agent_metrics import parse_turn
from megatron_swift.eval.datasets import read_agent

TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sa.generate(tmp_path_factory.mktemp("agent"), train=200, test=40, seed=3)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_hold_disjoint_tools_and_the_tokenizer_text_is_the_training_text(data):
    train_tools = {t["function"]["name"] for row in _rows(data["train"]) for t in row["tools"]}
    held_out = {t["function"]["name"] for row in _rows(data["test_out_of_domain"]) for t in row["tools"]}
    in_domain = {t["function"]["name"] for row in _rows(data["test_in_domain"]) for t in row["tools"]}
    assert in_domain <= train_tools and held_out and not held_out & train_tools
    corpus = data["corpus"].read_text()
    assert not any(name in corpus for name in held_out)


@pytest.mark.parametrize("split", ["test_in_domain", "test_out_of_domain"])
def test_every_step_is_scorable_by_the_agent_eval(data, split):
    dataset = read_agent(str(data[split]), skip_bad_rows=False)
    rows = _rows(data[split])
    assert len(dataset.rows) == len(rows) and dataset.unreadable_references.count == 0
    assert dataset.unreadable_reference_arguments.count == 0
    plans = Counter(reference.plan for reference in dataset.references)
    assert plans["call"] > plans["finish"] > 0 and plans["give_up"] > 0 and set(plans) == {"call", "finish", "give_up"}
    for row, reference, names in zip(rows, dataset.references, dataset.tools, strict=True):
        assert row["messages"][0]["role"] == "system" and row["messages"][-1]["role"] == "assistant"
        for call in reference.calls:  # typed arguments, as the offered schema says
            assert call.name in names
            schema = next(t["function"]["parameters"] for t in row["tools"] if t["function"]["name"] == call.name)
            assert set(schema["required"]) <= set(call.arguments) <= set(schema["properties"])
            for key, value in call.arguments.items():
                spec = schema["properties"][key]
                assert isinstance(value, TYPES[spec["type"]]) and ("enum" not in spec or value in spec["enum"])
        for tool in row["tools"]:  # the tools are listed where the model sees them
            assert tool["function"]["name"] + "(" in row["messages"][0]["content"]


def test_dependent_calls_use_the_first_tools_response(data):
    chained = 0
    for row in _rows(data["train"]):
        messages = row["messages"]
        names = [parse_turn(m["content"]).calls[0].name for m in messages if m["role"] == "assistant" and
                 parse_turn(m["content"]).plan == "call"]  # fmt: skip
        if names == ["search_flights", "book_flight"]:
            flight = json.loads(messages[3]["content"])["flight_id"]
            assert parse_turn(messages[4]["content"]).calls[0].arguments["flight_id"] == flight
            chained += 1
    assert chained > 0


def test_training_conversations_encode_with_a_loss_on_each_assistant_turn(data):
    from megatron_swift.eval.perplexity import encode_rows
    from megatron_swift.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    samples = encode_rows(data["train"], tokenizer, 2048, "sft")
    rows = _rows(data["train"])
    assert len(samples) == len(rows)
    for sample, row in zip(samples[:20], rows[:20], strict=True):
        target_text = tokenizer.decode([int(t) for t, w in zip(sample.ids, sample.weights, strict=True) if w > 0])
        for message in row["messages"]:
            if message["role"] == "assistant":
                assert message["content"] in target_text
            elif message["role"] in ("user", "tool"):
                assert message["content"] not in target_text


def test_the_same_seed_gives_the_same_files(data, tmp_path):
    again = sa.generate(tmp_path, train=200, test=40, seed=3)
    assert all(again[k].read_bytes() == data[k].read_bytes() for k in data)


def test_a_tokenizer_trained_on_the_training_text_shortens_it(data):
    from megatron_swift.models.tiny import make_tiny_tokenizer

    corpus = data["corpus"].read_text()
    default, trained = make_tiny_tokenizer(), make_tiny_tokenizer(1024, corpus)
    assert len(trained) == 1024
    assert len(trained(corpus)["input_ids"]) < 0.5 * len(default(corpus)["input_ids"])
    assert default.chat_template == trained.chat_template and trained.eos_token == "<|im_end|>"
