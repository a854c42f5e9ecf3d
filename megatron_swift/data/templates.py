"""Built-in chat templates (`BUILTIN`) and `make_template`, which picks one or the tokenizer's own (chat_template.py).

Each built-in renders, token for token, the chat template of one real model (tests compare them with the
originals on real vocabularies): chatml (OpenHermes-2.5's ChatML), qwen (Qwen2.5-Instruct, with its tool
calling), agent (Qwen2.5-Instruct without its default system prompt), llama3 (Meta-Llama-3-Instruct),
llama3_1 (Llama-3.1-Instruct, with tools), mistral (Mistral-7B-Instruct-v0.2), mistral_nemo
(Mistral-Nemo-Instruct-2407, with tools); plain has no chat markup. Python string building: no Jinja cost.
Conversations a real template refuses (e.g. Llama-3.1 with parallel tool calls) are refused the same way.

Tool calling (agent, qwen): tool schemas go into the system prompt, each assistant tool call is
`render_tool_call(name, arguments)`, tool results are `<tool_response>` blocks inside a user turn.
"""

from __future__ import annotations

import json

from megatron_swift.data.chat_template import TokenizerTemplate
from megatron_swift.data.errors import DataError, RowProblem
from megatron_swift.data.formats import Conversation
from megatron_swift.data.segments import GLUE, Segment

RENDERING = 2  # part of the sample cache key: bump when a template's output changes, so older entries are not reused
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")  # fmt: skip
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                "<args-json-object>}\n</tool_call>")  # fmt: skip
LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                 "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                 '"parameters": dictionary of argument name and its value}.Do not use variables.\n\n')  # fmt: skip


def render_tool_call(name: str, arguments: dict | str) -> str:
    """One Hermes / Qwen2.5 tool call: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>'


def render_tools(tools: list[dict]) -> str:
    """The tool schemas block of the system prompt (Qwen2.5 / Hermes)."""
    return TOOLS_HEADER + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + TOOLS_FOOTER


class BuiltinTemplate:
    name = ""
    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()  # once: it builds a dict of the whole vocabulary (~0.3 s for 150k tokens)
        missing = [t for t in self.special_tokens if t not in vocab]
        if missing:
            raise DataError(f"data.template={self.name}: the tokenizer has no token(s) {missing}; "
                            "choose the template of this model family (or template=tokenizer)")  # fmt: skip
        self.eos_token = tokenizer.eos_token or ""

    def segments(self, conversation: Conversation) -> list[Segment]:
        raise NotImplementedError

    @staticmethod
    def _assistant(turn: int, header: str, body: str) -> list[Segment]:
        return [Segment(header, GLUE, -1), Segment(body, "assistant", turn)]


class ChatMLTemplate(BuiltinTemplate):
    name, special_tokens = "chatml", ("<|im_start|>", "<|im_end|>")
    default_system: str | None = None
    tool_calling = False

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages, tools = conversation.messages, conversation.tools
        if (tools or any("tool_calls" in m or m["role"] == "tool" for m in messages)) and not self.tool_calling:
            raise RowProblem(f"template {self.name} does not render tools; use template agent or qwen")
        out: list[Segment] = []
        first = 0
        system = self.default_system
        if messages[0]["role"] == "system":
            system, first = messages[0]["content"], 1
        if tools:
            system = (system + "\n\n" if system else "") + render_tools(tools)
        if system is not None:
            out.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n", "system", 0 if first else -1))
        for i in range(first, len(messages)):
            message, role = messages[i], messages[i]["role"]
            if role == "assistant":
                calls = [render_tool_call(c["function"]["name"], c["function"]["arguments"])
                         for c in message.get("tool_calls", [])]  # fmt: skip
                body = "\n".join([message["content"]] * bool(message["content"]) + calls)
                out += self._assistant(i, "<|im_start|>assistant\n", body + "<|im_end|>\n")
            elif role == "tool":
                opens = i == 0 or messages[i - 1]["role"] != "tool"
                closes = i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
                text = "<|im_start|>user" * opens + f"\n<tool_response>\n{message['content']}\n</tool_response>"
                out.append(Segment(text + "<|im_end|>\n" * closes, "tool", i))
            else:
                out.append(Segment(f"<|im_start|>{role}\n{message['content']}<|im_end|>\n", role, i))
        return out


class AgentTemplate(ChatMLTemplate):
    name, tool_calling = "agent", True


class QwenTemplate(AgentTemplate):
    name, default_system = "qwen", QWEN_SYSTEM


class Llama3Template(BuiltinTemplate):
    """Meta-Llama-3-Instruct's template: header per message, trimmed content, `<|eot_id|>`; no tools."""

    name = "llama3"
    special_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def segments(self, conversation: Conversation) -> list[Segment]:
        _no_tools(self.name, conversation, "llama3_1")
        out = [Segment("<|begin_of_text|>", GLUE, -1)]
        for i, message in enumerate(conversation.messages):
            out += self._turn(i, message["role"], message["role"], message["content"].strip())
        return out

    @staticmethod
    def _turn(turn: int, role: str, header_role: str, body: str) -> list[Segment]:
        header = f"<|start_header_id|>{header_role}<|end_header_id|>\n\n"
        if role == "assistant":
            return BuiltinTemplate._assistant(turn, header, body + "<|eot_id|>")
        return [Segment(header + body + "<|eot_id|>", role, turn)]


class Llama31Template(Llama3Template):
    """Llama-3.1-Instruct's template: a system header always (knowledge and today's date), tools as JSON schemas in
    the first user message, one tool call per assistant message as `{"name", "parameters"}`, results as `ipython`."""

    name = "llama3_1"

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages, tools = conversation.messages, conversation.tools
        first = int(messages[0]["role"] == "system")
        system = ("Environment: ipython\n" if tools else "") + LLAMA31_DATES + (messages[0]["content"].strip() * first)
        out = [Segment("<|begin_of_text|>", GLUE, -1),
               Segment(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>", "system" if first else GLUE,
                       0 if first else -1)]  # fmt: skip
        if tools:
            if len(messages) == first or messages[first]["role"] != "user":
                raise RowProblem("template llama3_1 puts the tools into the first user message, and there is none")
            schemas = "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
            out += self._turn(first, "user", "user", LLAMA31_TOOLS + schemas + messages[first]["content"].strip())
            first += 1
        for i in range(first, len(messages)):
            message, role = messages[i], messages[i]["role"]
            if role == "tool":  # the template prints a string result with `tojson`: quoted and escaped
                out += self._turn(i, role, "ipython", json.dumps(message["content"], ensure_ascii=False))
            elif "tool_calls" in message:
                if len(message["tool_calls"]) != 1:
                    raise RowProblem(f"template llama3_1: messages[{i}] has parallel tool calls; Llama-3.1 makes one "
                                     "tool call per message (its template refuses more)")  # fmt: skip
                function = message["tool_calls"][0]["function"]
                arguments = json.dumps(function["arguments"], ensure_ascii=False)
                out += self._turn(i, role, role, f'{{"name": "{function["name"]}", "parameters": {arguments}}}')
            else:
                out += self._turn(i, role, role, message["content"].strip())
        return out


class MistralTemplate(BuiltinTemplate):
    """Mistral-7B-Instruct-v0.2's template: `<s> [INST] system\n\nquestion [/INST] answer</s>`; no tools."""

    name, special_tokens = "mistral", ("<s>", "</s>")

    def segments(self, conversation: Conversation) -> list[Segment]:
        _no_tools(self.name, conversation, "mistral_nemo")
        messages = conversation.messages
        first = int(messages[0]["role"] == "system")
        system = messages[0]["content"] + "\n\n" if first else ""
        _alternating(self.name, messages, first)
        out = [Segment("<s>", GLUE, -1)]
        for i in range(first, len(messages)):
            content = messages[i]["content"]
            if messages[i]["role"] == "user":
                out.append(Segment(f" [INST] {system if i == first else ''}{content} [/INST]", "user", i))
            else:
                out.append(Segment(f" {content}</s>", "assistant", i))
        return out


class MistralNemoTemplate(BuiltinTemplate):
    """Mistral-Nemo-Instruct-2407's template: `<s>[INST]question[/INST]answer</s>`, tools before the last user
    message, `[TOOL_CALLS]` with 9-character ids, `[TOOL_RESULTS]`. Like the original, the system prompt is
    printed only in front of a final user message: a conversation that ends with an answer has none."""

    name = "mistral_nemo"
    special_tokens = ("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]")  # fmt: skip

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages, tools = conversation.messages, conversation.tools
        first = int(messages[0]["role"] == "system")
        _alternating(self.name, messages, first, skip_tools=True)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        out = [Segment("<s>", GLUE, -1)]
        for i in range(first, len(messages)):
            message, role = messages[i], messages[i]["role"]
            if role == "user":
                # the original compares messages by value: an earlier copy of the last user message gets the tools too
                text = _nemo_tools(tools) if tools and message == messages[last_user] else ""
                system = messages[0]["content"] + "\n\n" if first and i + 1 == len(messages) else ""
                out.append(Segment(f"{text}[INST]{system}{message['content']}[/INST]", "user", i))
            elif "tool_calls" in message:  # the message's content is not printed
                calls = [json.dumps(c["function"], ensure_ascii=False)[:-1] + f', "id": "{_nemo_id(c.get("id"), i)}"}}'
                         for c in message["tool_calls"]]  # fmt: skip
                out.append(Segment("[TOOL_CALLS][" + ", ".join(calls) + "]</s>", "assistant", i))
            elif role == "assistant":
                out.append(Segment(message["content"] + "</s>", "assistant", i))
            else:
                call_id = _nemo_id(message.get("tool_call_id"), i)
                text = f'[TOOL_RESULTS]{{"content": {message["content"]}, "call_id": "{call_id}"}}[/TOOL_RESULTS]'
                out.append(Segment(text, "tool", i))
        return out


def _nemo_tools(tools: list[dict]) -> str:
    """Mistral-Nemo's tool list: each function's fields in order, strings printed raw (unescaped), others as JSON."""
    functions = []
    for tool in tools:
        fields = [f'"{key}": ' + (f'"{value}"' if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
                  for key, value in tool["function"].items() if key != "return"]  # fmt: skip
        functions.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
    return "[AVAILABLE_TOOLS][" + ", ".join(functions) + "][/AVAILABLE_TOOLS]"


def _nemo_id(value, turn: int) -> str:
    if not isinstance(value, str) or len(value) != 9:
        raise RowProblem(f"template mistral_nemo: messages[{turn}] needs a tool call id of 9 characters (tool_calls "
                         f"'id' / tool message 'tool_call_id'), got {value!r}")  # fmt: skip
    return value


def _alternating(name: str, messages: list[dict], first: int, skip_tools: bool = False) -> None:
    """Mistral's templates refuse anything but user, assistant, user, ... after an optional first system message
    (Mistral-Nemo's leaves tool calls and tool results out of that count)."""
    turns = [i for i in range(first, len(messages))
             if not (skip_tools and (messages[i]["role"] == "tool" or "tool_calls" in messages[i]))]  # fmt: skip
    for k, i in enumerate(turns):
        if messages[i]["role"] != ("user", "assistant")[k % 2]:
            raise RowProblem(f"template {name}: after an optional system message, roles must alternate user/assistant "
                             f"(messages[{i}] is {messages[i]['role']})")  # fmt: skip


def _no_tools(name: str, conversation: Conversation, instead: str) -> None:
    if conversation.tools or any(m["role"] == "tool" or "tool_calls" in m for m in conversation.messages):
        raise RowProblem(f"template {name} does not render tools; use template {instead} or tokenizer")


class PlainTemplate(BuiltinTemplate):
    """No chat markup: each turn's text on its own line, each answer ended by the EOS token."""

    name = "plain"

    def segments(self, conversation: Conversation) -> list[Segment]:
        if conversation.tools or any("tool_calls" in m for m in conversation.messages):
            raise RowProblem("template plain does not render tool calls; use template agent")
        return [
            Segment(m["content"] + (self.eos_token if m["role"] == "assistant" else "") + "\n", m["role"], i)
            for i, m in enumerate(conversation.messages)
        ]


BUILTIN = {t.name: t for t in (ChatMLTemplate, AgentTemplate, QwenTemplate, Llama3Template, Llama31Template,
                               MistralTemplate, MistralNemoTemplate, PlainTemplate)}  # fmt: skip
TEMPLATES = ("auto", "tokenizer", *BUILTIN)


def make_template(name: str, tokenizer):
    """`auto` is the tokenizer's chat_template when it has one, else chatml."""
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name not in BUILTIN:
        raise DataError(f"data.template={name!r} is not one of {', '.join(TEMPLATES)}")
    return BUILTIN[name](tokenizer)
