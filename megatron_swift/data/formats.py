"""Row formats, detected per row or forced, normalised to one internal form.

Chat rows become a `Conversation`: OpenAI-style messages (roles system/user/assistant/tool, string
contents, assistant `tool_calls` as `{"id"?, "type": "function", "function": {"name", "arguments": dict}}`,
tool messages' `tool_call_id` kept when given: some templates print them, e.g. Mistral-Nemo's) plus optional
tool schemas. Arguments given as a JSON string (OpenAI's wire format) are decoded: chat templates print them
with `tojson` and expect an object (a string would be printed as a quoted, escaped JSON string), and vLLM's
OpenAI server decodes them the same way before rendering. Pretraining rows become plain text. Accepted inputs:

- messages:       {"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?: [...]}
- sharegpt:       {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|..., "value"}], "system"?, "tools"?}
- alpaca:         {"instruction", "input"?, "output", "system"?}
- query_response: {"query", "response", "system"?, "history"?: [[query, response], ...]}
- text:           {"text"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_swift.data.errors import RowProblem

FORMATS = ("messages", "sharegpt", "alpaca", "query_response", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function": "tool"}  # fmt: skip


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None


def detect(data: dict) -> str:
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "query" in data and "response" in data:
        return "query_response"
    if "text" in data:
        return "text"
    raise RowProblem(f"cannot tell the row format from its fields {sorted(data)}; expected one of {', '.join(FORMATS)}")


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{what} must be a string, got {type(value).__name__}")
    return value


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise RowProblem(f"{where}.tool_calls must be a non-empty list")
    normalised = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(f"{where}.tool_calls[{j}] needs a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise RowProblem(f"{where}.tool_calls[{j}].arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise RowProblem(f"{where}.tool_calls[{j}].arguments must be an object")
        call_id = {"id": _string(call["id"], f"{where}.tool_calls[{j}].id")} if "id" in call else {}
        normalised.append(
            {**call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}
        )
    return normalised


def _tools(tools) -> list[dict] | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowProblem("tools is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem("tools must be a list of function schemas")
    return tools


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowProblem("'messages' must be a non-empty list")
    normalised = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise RowProblem(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        role, content = message["role"], message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            if content is not None:
                _string(content, f"{where}.content")
            normalised.append({"role": role, "content": content or "",
                               "tool_calls": _tool_calls(message["tool_calls"], where)})  # fmt: skip
        else:
            normalised.append({"role": role, "content": _string(content, f"{where}.content")})
            if role == "tool" and "tool_call_id" in message:
                normalised[-1]["tool_call_id"] = _string(message["tool_call_id"], f"{where}.tool_call_id")
    return normalised


def _sharegpt(data: dict) -> list[dict]:
    turns = data["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RowProblem("'conversations' must be a non-empty list")
    messages = [{"role": "system", "content": _string(data["system"], "system")}] if data.get("system") else []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RowProblem(
                f"conversations[{i}] has unknown 'from' {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append(
            {"role": SHAREGPT_ROLES[speaker], "content": _string(turn.get("value"), f"conversations[{i}].value")}
        )
    return messages


def _query_response(data: dict) -> list[dict]:
    messages = [{"role": "system", "content": _string(data["system"], "system")}] if data.get("system") else []
    history = data.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("history must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowProblem(f"history[{i}] must be a [query, response] pair")
        messages += [{"role": "user", "content": _string(pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _string(pair[1], f"history[{i}][1]")}]  # fmt: skip
    return [*messages, {"role": "user", "content": _string(data["query"], "query")},
            {"role": "assistant", "content": _string(data["response"], "response")}]  # fmt: skip


def normalise(data: dict, fmt: str = "auto") -> Conversation | str:
    """The row as a Conversation (chat formats) or a str (text); RowProblem says what is wrong."""
    fmt = detect(data) if fmt == "auto" else fmt
    missing = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction", "query_response": "query",
               "text": "text"}[fmt]  # fmt: skip
    if missing not in data:
        raise RowProblem(f"{fmt} rows need a field {missing!r}")
    if fmt == "text":
        return _string(data["text"], "text")
    if fmt == "messages":
        messages = _messages(data["messages"])
    elif fmt == "sharegpt":
        messages = _sharegpt(data)
    elif fmt == "alpaca":
        prompt = _string(data["instruction"], "instruction")
        if data.get("input"):
            prompt += "\n" + _string(data["input"], "input")
        system = [{"role": "system", "content": _string(data["system"], "system")}] if data.get("system") else []
        messages = [*system, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _string(data.get("output"), "output")}]  # fmt: skip
    else:
        messages = _query_response(data)
    if fmt != "messages":
        messages = _messages(messages)  # the same role/content checks for every chat format
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn, so no token to train on")
    return Conversation(messages, _tools(data.get("tools")))
