"""Chat templates against the real ones (tests/references.py): token ids equal `apply_chat_template`, labels on
exactly the assistant turns, each built-in equal to its named real template, refusals where the real one refuses."""

import json
import re

import numpy as np
import pytest

from megatron_swift.data import DataError, build_train_data
from megatron_swift.data.encode import Encoder
from megatron_swift.data.errors import RowProblem
from megatron_swift.data.formats import normalise
from megatron_swift.data.labels import LossPolicy
from megatron_swift.data.sources import Row
from megatron_swift.data.templates import BUILTIN, make_template, render_tool_call
from megatron_swift.training.config import DataSection
from tests.data_helpers import (
    chat_conversations,
    chatml_tokenizer,
    tiny_tokenizer_with,
    tool_conversations,
    write_jsonl,
)
from tests.references import REFERENCES, reference_tokenizer

QWEN, LLAMA3, LLAMA31, HERMES = "Qwen2.5-7B-Instruct", "Meta-Llama-3-8B-Instruct", "Llama-3.1-8B-Instruct", (
    "Hermes-3-Llama-3.1-8B (tool_use)")  # fmt: skip
MISTRAL_OLD, MISTRAL, NEMO, OPENHERMES = ("Mistral-7B-Instruct-v0.2 (old)", "Mistral-7B-Instruct-v0.2",
                                          "Mistral-Nemo-Instruct-2407", "OpenHermes-2.5-Mistral-7B")  # fmt: skip


def _hermes_calls(message: dict) -> list[str]:
    return ['<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'  # noqa: UP031 - the literal format
            % (c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False))
            for c in message.get("tool_calls", [])]  # fmt: skip


def _nemo_calls(message: dict) -> str:
    calls = [json.dumps({**c["function"], "id": c["id"]}, ensure_ascii=False) for c in message["tool_calls"]]
    return "[TOOL_CALLS][" + ", ".join(calls) + "]"


def _llama31_call(message: dict) -> str:
    (call,) = [c["function"] for c in message["tool_calls"]]
    return json.dumps({"name": call["name"], "parameters": call["arguments"]}, ensure_ascii=False)


# What the model generates for one assistant message (what the loss covers), written out from each real
# template's source, independently of our code.
GENERATED = {
    QWEN: lambda m: "\n".join([m["content"]] * bool(m["content"]) + _hermes_calls(m)) + "<|im_end|>\n",
    OPENHERMES: lambda m: m["content"] + "<|im_end|>\n",
    HERMES: lambda m: ("\n".join(_hermes_calls(m)) if "tool_calls" in m else m["content"]) + "<|im_end|>\n",
    LLAMA3: lambda m: m["content"].strip() + "<|eot_id|>",
    LLAMA31: lambda m: (_llama31_call(m) if "tool_calls" in m else m["content"].strip()) + "<|eot_id|>",
    MISTRAL_OLD: lambda m: m["content"] + "</s>",
    MISTRAL: lambda m: " " + m["content"] + "</s>",
    NEMO: lambda m: (_nemo_calls(m) if "tool_calls" in m else m["content"]) + "</s>",
}
TOOLS = (QWEN, HERMES, LLAMA31, NEMO)  # the references whose templates render tool calls
BUILTIN_EQUALS = {"chatml": OPENHERMES, "qwen": QWEN, "llama3": LLAMA3, "llama3_1": LLAMA31, "mistral": MISTRAL,
                  "mistral_nemo": NEMO, "agent": QWEN}  # fmt: skip


def _rows(reference: str, template: str) -> list[dict]:
    """The conversations a reference template renders: chats, tool chats where it has tools (Hermes-3's
    tool_use template needs tools), no system for the old Mistral one (it refuses a system message), one tool call
    per message for Llama-3.1 (it refuses parallel calls)."""
    rows = ([] if reference == HERMES else chat_conversations()) + (tool_conversations() if reference in TOOLS else [])
    if reference == MISTRAL_OLD:
        rows = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in rows]
    if reference == LLAMA31:
        rows = [r for r in rows if all(len(m.get("tool_calls", [])) < 2 for m in r["messages"])]
    if template == "agent":  # agent is Qwen2.5 without its default system prompt
        rows = [r for r in rows if r["messages"][0]["role"] == "system"]
    return rows


def _encode(tokenizer, template, row: dict, policy: LossPolicy | None = None):
    (sample,) = Encoder(tokenizer, template, policy or LossPolicy()).encode([Row("t:1", row)])
    return sample


def _expected_weights(tokenizer, text: str, generated: list[str]) -> list[float]:
    """1 for each token that starts inside the generated text of an assistant message (found in order), else 0."""
    spans, position = [], 0
    for piece in generated:
        start = text.index(piece, position)
        spans.append((start, start + len(piece)))
        position = start + len(piece)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [float(any(s <= start < e for s, e in spans)) for start, _ in offsets]


@pytest.fixture(scope="module")
def references():
    """Loads each reference once for the module (a few seconds each on first use, then cached)."""
    return {name: reference_tokenizer(name) for name in REFERENCES}


@pytest.mark.parametrize(("template", "reference"),
                         [("auto", name) for name in REFERENCES] + list(BUILTIN_EQUALS.items()))  # fmt: skip
def test_tokens_equal_the_real_template_and_labels_cover_exactly_the_generated_turns(references, template, reference):
    tokenizer = references[reference]
    ours = make_template(template, tokenizer)
    rows = _rows(reference, template)
    assert len(rows) >= 5
    for row in rows:
        conversation = normalise(row)
        expected = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools)["input_ids"]
        sample = _encode(tokenizer, ours, row)
        assert not isinstance(sample, str), (sample, row)
        assert sample.ids.tolist() == list(expected), (template, reference, row)
        text = tokenizer.decode(expected)
        generated = [GENERATED[reference](m) for m in conversation.messages if m["role"] == "assistant"]
        assert sample.weights.tolist() == _expected_weights(tokenizer, text, generated), (template, row)


def test_prefix_unstable_templates_are_aligned(references):
    """Hermes-3 closes a last tool message differently; Mistral-Nemo prints the system prompt only in a final user
    turn: rendering a prefix of these conversations does not give a prefix of the text."""
    (tool_row, *_) = tool_conversations()
    conversation = normalise(tool_row)
    hermes = references[HERMES]
    ends_with_tool = hermes.apply_chat_template(conversation.messages[:3], tools=conversation.tools, tokenize=False)
    assert not hermes.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=False).startswith(
        ends_with_tool
    )
    nemo, system = references[NEMO], [{"role": "system", "content": "Be brief."}]
    messages = [*system, *chat_conversations()[0]["messages"]]
    prompt = nemo.apply_chat_template(messages[:2], tokenize=False)
    assert "Be brief." in prompt and not nemo.apply_chat_template(messages, tokenize=False).startswith(prompt)
    for tokenizer, row in ((hermes, tool_row), (nemo, {"messages": messages})):
        sample = _encode(tokenizer, make_template("auto", tokenizer), row)
        assert not isinstance(sample, str), sample
        assert tokenizer.decode(sample.ids[sample.weights > 0]).endswith(("Sunny, and it is noon.<|im_end|>\n",
                                                                          "Paris.</s>"))  # fmt: skip


@pytest.mark.parametrize(
    ("template", "reference", "row", "refusal"),
    [
        ("auto", LLAMA31, tool_conversations()[1], "This model only supports single tool-calls at once!"),
        ("llama3_1", LLAMA31, tool_conversations()[1], "Llama-3.1 makes one tool call per message"),
        ("auto", MISTRAL_OLD, chat_conversations()[1], "Conversation roles must alternate"),
        ("auto", HERMES, chat_conversations()[0], "refuses"),  # its tool_use template needs tools
        ("auto", NEMO, {**tool_conversations()[0], "messages": [
            {k: v for k, v in m.items() if k != "tool_call_id"} for m in tool_conversations()[0]["messages"]]},
         "Tool call IDs should be alphanumeric strings with length 9!"),
        ("mistral_nemo", NEMO, {**tool_conversations()[0], "messages": [
            {k: v for k, v in m.items() if k != "tool_call_id"} for m in tool_conversations()[0]["messages"]]},
         "needs a tool call id of 9 characters"),
        ("auto", LLAMA3, tool_conversations()[0], "does not print assistant messages[1]"),  # drops tool calls
    ],
)  # fmt: skip
def test_what_the_real_template_refuses_is_refused_naming_the_row(references, tmp_path, template, reference, row,
                                                                  refusal):  # fmt: skip
    tokenizer = references[reference]
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    data = DataSection(dataset=[str(path)], template=template, seq_length=512)
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*" + re.escape(refusal)):
        build_train_data(data, tokenizer, "sft", 1, 0)


def test_tool_call_ids_reach_the_template():
    conversation = normalise(tool_conversations()[1])
    assert [c["id"] for c in conversation.messages[2]["tool_calls"]] == ["wthr00001", "time00002"]
    assert [m["tool_call_id"] for m in conversation.messages if m["role"] == "tool"] == ["wthr00001", "time00002"]
    with pytest.raises(RowProblem, match=r"messages\[1\]\.tool_calls\[0\]\.id must be a string"):
        call = {"id": 7, "function": {"name": "f"}}
        normalise({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]})


def test_json_string_arguments_are_decoded_because_templates_print_them_with_tojson(references):
    """The row's arguments as a JSON string (OpenAI's wire format) would be printed by Qwen2.5's `tojson` as a quoted,
    escaped string, a form the model never saw: they are decoded, and the tokens are those of the decoded row."""
    tokenizer, row = references[QWEN], tool_conversations()[4]  # its first call's arguments are a JSON string
    assert isinstance(row["messages"][2]["tool_calls"][0]["function"]["arguments"], str)
    raw = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert '"arguments": "{\\"city\\": \\"Paris\\"}"' in raw
    conversation = normalise(row)
    decoded = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools)["input_ids"]
    for template in ("auto", "qwen"):
        sample = _encode(tokenizer, make_template(template, tokenizer), row)
        assert sample.ids.tolist() == list(decoded)
        assert '"name": "get_time", "arguments": {"city": "Paris"}' in tokenizer.decode(sample.ids[sample.weights > 0])


@pytest.mark.parametrize("template", sorted(set(BUILTIN) - {"plain"}))
def test_a_builtin_template_reads_the_vocabulary_once(references, template):
    tokenizer = references[BUILTIN_EQUALS[template]]
    calls = []
    get_vocab = tokenizer.get_vocab

    def counted():
        calls.append(1)
        return get_vocab()

    tokenizer.get_vocab = counted
    try:
        make_template(template, tokenizer)
    finally:
        del tokenizer.get_vocab
    assert len(calls) == 1


def test_render_tool_call_is_the_hermes_format():
    assert (
        render_tool_call("f", '{"x": [1, "é"]}')
        == '<tool_call>\n{"name": "f", "arguments": {"x": [1, "é"]}}\n</tool_call>'
    )


def test_agent_template_puts_tools_in_the_system_prompt_and_masks_tool_results():
    tokenizer = chatml_tokenizer()
    sample = _encode(tokenizer, make_template("agent", tokenizer), tool_conversations()[1], LossPolicy("all"))
    text = tokenizer.decode(sample.ids)
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools") and '"name": "get_time"' in text
    masked = tokenizer.decode(sample.ids[1:][sample.weights[1:] == 0])
    results = '<tool_response>\n{"sky": "sunny"}\n</tool_response>\n<tool_response>\n12:00\n</tool_response>'
    assert masked == f"<|im_start|>user\n{results}<|im_end|>\n"


@pytest.mark.parametrize("template", ["qwen", "auto"])
def test_loss_policies_last_round_and_per_role_scale(references, template):
    tokenizer = references[QWEN]
    row = tool_conversations()[2]  # two rounds: a tool round, then "Thanks!" / "You are welcome."
    last = _encode(tokenizer, make_template(template, tokenizer), row, LossPolicy("last_round"))
    assert tokenizer.decode(last.ids[last.weights > 0]) == "You are welcome.<|im_end|>\n"
    scaled = _encode(tokenizer, make_template(template, tokenizer), row, LossPolicy("all", {"tool": 0.0, "user": 0.5}))
    assert "Weather and time in Paris?" in tokenizer.decode(scaled.ids[scaled.weights == 0.5])
    assert '{"sky": "sunny"}' in tokenizer.decode(scaled.ids[scaled.weights == 0])
    assert set(np.unique(scaled.weights).tolist()) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize(
    ("template", "problem"),
    [("chatml", "template chatml does not render tools"), ("llama3", "template llama3 does not render tools"),
     ("mistral", "template mistral does not render tools")],
)  # fmt: skip
def test_templates_that_cannot_render_tools_say_so(template, problem):
    tokenizer = tiny_tokenizer_with(*BUILTIN[template].special_tokens)
    (result,) = Encoder(tokenizer, make_template(template, tokenizer), LossPolicy()).encode(
        [Row("t:1", tool_conversations()[0])]
    )
    assert result.startswith(problem)


def test_builtin_template_needs_its_special_tokens():
    with pytest.raises(DataError, match=r"data.template=llama3: the tokenizer has no token\(s\)"):
        make_template("llama3", chatml_tokenizer())
