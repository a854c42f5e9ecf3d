"""Chat templates: a conversation as text segments, each tagged with the role that owns it.

The segments concatenate to the exact text the model sees; labels (labels.py) come from the roles,
so the rendered tokens and the loss mask can never disagree. Two kinds of template:

- `TokenizerTemplate`: the tokenizer's own Jinja `chat_template`, rendered by
  `tokenizer.apply_chat_template`; turn boundaries come from rendering prefixes of the conversation,
  so the tokens equal `apply_chat_template`'s exactly.
- built-in templates (`BUILTIN`): chatml, qwen (ChatML + Qwen2.5's default system), agent (ChatML
  with Hermes / Qwen2.5 tool calling), llama3, mistral, plain. Python string building: no Jinja cost.

Tool calling (agent, qwen): tool schemas go into the system prompt, each assistant tool call is
`render_tool_call(name, arguments)`, tool results are `<tool_response>` blocks inside a user turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_swift.data.errors import DataError, RowProblem
from megatron_swift.data.formats import Conversation

GLUE = "template"  # role of the template's own tokens between turns (trained only with loss_scale=all)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")  # fmt: skip
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                "<args-json-object>}\n</tool_call>")  # fmt: skip


@dataclass(frozen=True)
class Segment:
    text: str
    role: str  # system / user / assistant / tool, or GLUE
    turn: int  # index of the message it belongs to (-1 for GLUE)


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
        missing = [t for t in self.special_tokens if t not in tokenizer.get_vocab()]
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
    name = "llama3"
    special_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def segments(self, conversation: Conversation) -> list[Segment]:
        if conversation.tools or any(m["role"] == "tool" or "tool_calls" in m for m in conversation.messages):
            raise RowProblem("template llama3 does not render tools; use template=tokenizer with a Llama-3.1 tokenizer")
        out = [Segment("<|begin_of_text|>", GLUE, -1)]
        for i, message in enumerate(conversation.messages):
            header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
            body = message["content"].strip() + "<|eot_id|>"
            if message["role"] == "assistant":
                out += self._assistant(i, header, body)
            else:
                out.append(Segment(header + body, message["role"], i))
        return out


class MistralTemplate(BuiltinTemplate):
    """Mistral-Instruct: `<s>[INST] user [/INST]answer</s>`, the system prompt heading the first user turn."""

    name, special_tokens = "mistral", ("<s>", "</s>")

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages = conversation.messages
        if conversation.tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            raise RowProblem("template mistral does not render tools; use template=tokenizer")
        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        out = [Segment("<s>", GLUE, -1)]
        for i, message in enumerate(messages):
            if message["role"] == "user":
                out.append(Segment(f"[INST] {system}{message['content']} [/INST]", "user", i))
                system = ""
            elif message["role"] == "assistant":
                out.append(Segment(message["content"] + "</s>", "assistant", i))
        return out


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


BUILTIN = {t.name: t for t in (ChatMLTemplate, AgentTemplate, QwenTemplate, Llama3Template, MistralTemplate,
                               PlainTemplate)}  # fmt: skip
TEMPLATES = ("auto", "tokenizer", *BUILTIN)


class TokenizerTemplate:
    """The tokenizer's Jinja chat template; turn boundaries from rendering prefixes of the conversation."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template=tokenizer: the tokenizer has no chat_template; choose a built-in template")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], tools, generation_prompt: bool = False) -> str | None:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception:  # a template may refuse a prefix (e.g. it must end with a user turn): no boundary there
            return None

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages, tools = conversation.messages, conversation.tools
        full = self._render(messages, tools)
        if full is None:
            raise RowProblem("the tokenizer's chat_template cannot render this conversation")
        out: list[Segment] = []
        done, closed = 0, True  # characters already in segments; whether the last message ended at `done`

        def cut(end: int, role: str, turn: int) -> None:
            nonlocal done
            out.append(Segment(full[done:end], role, turn))
            done = end

        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._render(messages[:i], tools, generation_prompt=True) if i else None
                end = self._render(messages[: i + 1], tools)
                if prompt is None or end is None or not full.startswith(prompt) or not full.startswith(end):
                    raise RowProblem(f"the tokenizer's chat_template does not render assistant turn messages[{i}] as "
                                     "a prefix of the conversation; use a built-in template")  # fmt: skip
                cut(len(prompt), GLUE if closed else messages[i - 1]["role"], -1 if closed else i - 1)
                cut(len(end), "assistant", i)
                closed = True
            else:
                end = self._render(messages[: i + 1], tools)
                closed = end is not None and full.startswith(end) and len(end) >= done
                if closed:
                    cut(len(end), message["role"], i)
        if done < len(full):
            cut(len(full), GLUE if closed else messages[-1]["role"], -1 if closed else len(messages) - 1)
        return [s for s in out if s.text]


def make_template(name: str, tokenizer):
    """`auto` is the tokenizer's chat_template when it has one, else chatml."""
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name not in BUILTIN:
        raise DataError(f"data.template={name!r} is not one of {', '.join(TEMPLATES)}")
    return BUILTIN[name](tokenizer)
