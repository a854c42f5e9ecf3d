"""Chat templates and loss masks: parity with `apply_chat_template`, labels on exactly the assistant tokens."""

import json

import numpy as np
import pytest

from megatron_swift.data.encode import Encoder
from megatron_swift.data.errors import DataError
from megatron_swift.data.formats import normalise
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import Row
from megatron_swift.data.templates import make_template, render_tool_call
from tests.data_helpers import (
    chat_conversations,
    llama3_tokenizer,
    mistral_tokenizer,
    qwen_tokenizer,
    tool_conversations,
)

FAMILIES = {  # tokenizer with its family's Jinja template, the built-in template of the family, conversations
    "qwen2.5": (qwen_tokenizer, "qwen", lambda: chat_conversations() + tool_conversations()),
    "llama3": (llama3_tokenizer, "llama3", chat_conversations),
    "mistral": (mistral_tokenizer, "mistral", lambda: [{"messages": [m for m in c["messages"] if m["role"] != "system"]}
                                                        for c in chat_conversations()]),  # its template has no system
}  # fmt: skip


def _assistant_text(message: dict, family: str) -> str:
    """What the loss covers for one assistant message, written out independently of the templates."""
    if family == "llama3":
        return message["content"].strip() + "<|eot_id|>"
    if family == "mistral":
        return message["content"] + "</s>"
    calls = [
        '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'  # noqa: UP031 - the literal Hermes format
        % (c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False))
        for c in message.get("tool_calls", [])
    ]
    return "\n".join([message["content"]] * bool(message["content"]) + calls) + "<|im_end|>\n"


def _encode(tokenizer, template: str, row: dict, policy: LossPolicy | None = None):
    (sample,) = Encoder(tokenizer, make_template(template, tokenizer), policy or LossPolicy()).encode([Row("t:1", row)])
    assert not isinstance(sample, str), sample
    return sample


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_template_equals_apply_chat_template_and_masks_only_assistant_tokens(family):
    make_tokenizer, builtin, conversations = FAMILIES[family]
    tokenizer, rows = make_tokenizer(), conversations()
    assert len(rows) >= 12
    for row in rows:
        conversation = normalise(row)  # tool-call arguments given as JSON strings become objects
        expected = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=True)
        expected = list(expected["input_ids"])
        full = tokenizer.decode(expected)
        for template in ("tokenizer", builtin):
            sample = _encode(tokenizer, template, row)
            assert sample.ids.tolist() == expected, (family, template, row)
            trained = tokenizer.decode(sample.ids[sample.weights > 0])
            assistant = [m for m in conversation.messages if m["role"] == "assistant"]
            assert trained == "".join(_assistant_text(m, family) for m in assistant), (template, trained)
            untrained = tokenizer.decode(sample.ids[sample.weights == 0])
            assert len(untrained) + len(trained) == len(full)
            assert set(np.unique(sample.weights).tolist()) <= {0.0, 1.0}


def test_conversation_count_of_the_parity_check_is_at_least_twenty():
    assert sum(len(conversations()) for _, _, conversations in FAMILIES.values()) >= 20


def test_render_tool_call_is_the_hermes_format():
    assert (
        render_tool_call("f", '{"x": [1, "é"]}')
        == '<tool_call>\n{"name": "f", "arguments": {"x": [1, "é"]}}\n</tool_call>'
    )


def test_agent_template_puts_tools_in_the_system_prompt_and_masks_tool_results():
    tokenizer = qwen_tokenizer()
    row = tool_conversations()[1]
    sample = _encode(tokenizer, "agent", row, LossPolicy("all"))
    text = tokenizer.decode(sample.ids)
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools") and '"name": "get_time"' in text
    masked = tokenizer.decode(sample.ids[1:][sample.weights[1:] == 0])
    results = '<tool_response>\n{"sky": "sunny"}\n</tool_response>\n<tool_response>\n12:00\n</tool_response>'
    assert masked == f"<|im_start|>user\n{results}<|im_end|>\n"


def test_loss_policies_last_round_and_per_role_scale():
    tokenizer = qwen_tokenizer()
    row = tool_conversations()[2]  # two rounds: a tool round, then "Thanks!" / "You are welcome."
    last = _encode(tokenizer, "qwen", row, LossPolicy("last_round"))
    assert tokenizer.decode(last.ids[last.weights > 0]) == "You are welcome.<|im_end|>\n"
    scaled = _encode(tokenizer, "qwen", row, LossPolicy("all", {"tool": 0.0, "user": 0.5}))
    user_tokens = scaled.weights == 0.5
    assert "Weather and time in Paris?" in tokenizer.decode(scaled.ids[user_tokens]) and scaled.weights[0] == 1.0


@pytest.mark.parametrize(
    ("template", "row", "problem"),
    [
        ("chatml", tool_conversations()[0], "template chatml does not render tools"),
        ("llama3", tool_conversations()[0], "template llama3 does not render tools"),
    ],
)
def test_templates_that_cannot_render_tools_say_so(template, row, problem):
    tokenizer = llama3_tokenizer() if template == "llama3" else qwen_tokenizer()
    (result,) = Encoder(tokenizer, make_template(template, tokenizer), LossPolicy()).encode([Row("t:1", row)])
    assert result.startswith(problem)


def test_builtin_template_needs_its_special_tokens():
    with pytest.raises(DataError, match=r"data.template=llama3: the tokenizer has no token\(s\)"):
        make_template("llama3", qwen_tokenizer())
