"""`template: tokenizer` (what `auto` picks when the tokenizer has a chat template): the tokenizer's own Jinja
template, rendered by `apply_chat_template`, with the assistant turns found in its output.

The text is `apply_chat_template(messages, tools=tools)` on the row's messages, so the token ids are
exactly those of the real template. The turns are found without assuming that rendering a prefix of the
conversation gives a prefix of the text (Hermes-3 closes a last tool message differently; Mistral-Nemo
moves the system prompt into the last user turn):

1. The conversation is rendered a second time with every message content and tool-call name replaced
   by a unique sentinel (letters and digits: no template filter changes it). The text between sentinels
   is the template's own; the real text is the same pieces around each value as the template printed it
   (as is, trimmed, or JSON-escaped), which gives each sentinel's place in the real text.
2. What the model generates for assistant turn i is what the template renders after the generation
   prompt when that turn is the last message: the rendering of messages[:i + 1] past the rendering of
   messages[:i] with `add_generation_prompt`. Its part after the turn's last sentinel (rest of the tool
   calls, end-of-turn tokens) must follow that sentinel in the conversation; its part before the first
   sentinel is taken as far as it precedes it there (templates may drop a past turn's reasoning).
3. The assistant turns are those spans; each other message owns the text up to the end of its content;
   what is left is template markup (GLUE).

A row is refused (RowProblem, with the template's own error where it raised one) when the template
refuses it or when one of these steps finds no consistent answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from megatron_swift.data.errors import DataError, RowProblem
from megatron_swift.data.formats import Conversation
from megatron_swift.data.segments import GLUE, Segment

_NOT_PRINTED = ("the tokenizer's chat_template does not print assistant messages[{}] (neither its content nor its "
                "tool calls are in the text), so there is nothing to train; use a built-in template")  # fmt: skip


@dataclass(frozen=True)
class _Piece:
    """One sentinel of the marked rendering: which message it stands for, and where it is in both texts."""

    message: int
    marked: tuple[int, int]  # [start, end) in the marked rendering
    real: tuple[int, int]  # [start, end) of the value as printed in the real rendering


def _printed_forms(value: str) -> list[str]:
    """The ways templates print a string value: as is, trimmed (Jinja `trim`, `strip('\\n')`), JSON-escaped."""
    forms = [value, value.strip(), value.lstrip(), value.rstrip(), value.strip("\n"), value.lstrip("\n"),
             value.rstrip("\n"), json.dumps(value, ensure_ascii=False)[1:-1]]  # fmt: skip
    return list(dict.fromkeys(forms))


class TokenizerTemplate:
    """The tokenizer's Jinja chat template; assistant turns found by sentinel alignment (module docstring)."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template=tokenizer: the tokenizer has no chat_template; choose a built-in template")
        self.tokenizer = tokenizer
        self.nonce = uuid.uuid4().hex[:12]
        self.sentinel = re.compile(f"Q{self.nonce}Z([0-9]+)Q")

    @staticmethod
    def _printed_forms(value: str) -> list[str]:  # a method so that a template printing values otherwise can say so
        return _printed_forms(value)

    def _render(self, messages: list[dict], tools, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # the template's raise_exception (or a failure on this data): say which
            raise RowProblem(f"the tokenizer's chat_template refuses {len(messages)} message(s): {error}") from None

    def _mark(self, messages: list[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
        """Messages with sentinels for values, and (message index, real value) per sentinel number."""
        marked, values = [], []

        def sentinel(index: int, value: str) -> str:
            values.append((index, value))
            return f"Q{self.nonce}Z{len(values) - 1}Q"

        for i, message in enumerate(messages):
            message = dict(message)
            calls = message.get("tool_calls")
            # an empty content stays empty: templates test it (`if message.content`) and would render otherwise
            if message["content"] or (message["role"] == "assistant" and not calls):
                message["content"] = sentinel(i, message["content"])
            if calls:
                message["tool_calls"] = [
                    {**c, "function": {**c["function"], "name": sentinel(i, c["function"]["name"])}} for c in calls
                ]
            marked.append(message)
        return marked, values

    def _align(self, marked: str, real: str, values: list[tuple[int, str]]) -> list[_Piece]:
        """Each sentinel's place in `marked` and the place of its printed value in `real`."""
        pieces, position, last = [], 0, 0
        matches = list(self.sentinel.finditer(marked))
        for k, match in enumerate(matches):
            before = marked[last : match.start()]
            after = marked[match.end() : matches[k + 1].start() if k + 1 < len(matches) else len(marked)]
            index, value = values[int(match.group(1))]
            if not real.startswith(before, position):
                break
            position += len(before)
            is_last = k + 1 == len(matches)
            form = next((f for f in self._printed_forms(value) if real.startswith(f + after, position)
                         and (not is_last or position + len(f + after) == len(real))), None)  # fmt: skip
            if form is None:
                raise RowProblem(f"the tokenizer's chat_template prints messages[{index}] in a form that cannot be "
                                 "aligned with its text; use a built-in template")  # fmt: skip
            pieces.append(_Piece(index, match.span(), (position, position + len(form))))
            position += len(form)
            last = match.end()
        else:
            if marked[last:] == real[position:]:
                return pieces
        raise RowProblem("the tokenizer's chat_template renders this conversation differently when its contents "
                         "change, so its turns cannot be found; use a built-in template")  # fmt: skip

    def _output(self, marked_messages: list[dict], i: int, tools) -> tuple[str, str]:
        """Assistant turn i as the model generates it: (the part before its first sentinel, the part after its last)."""
        turn = self._render(marked_messages[: i + 1], tools)
        prompt = self._render(marked_messages[:i], tools, generation_prompt=True)
        names = [c["function"]["name"] for c in marked_messages[i].get("tool_calls", [])]
        sentinels = {marked_messages[i]["content"], *names} - {""}
        own = [m for m in self.sentinel.finditer(turn) if m.group(0) in sentinels]
        if not own:
            raise RowProblem(_NOT_PRINTED.format(i))
        # The generation prompt's tail after its last sentinel (end of the previous message, then the assistant
        # header) must follow that sentinel in the turn's rendering: the model's output starts after it.
        earlier = list(self.sentinel.finditer(prompt))
        tail, at = prompt, 0
        if earlier:
            tail, found = prompt[earlier[-1].end() :], turn.find(earlier[-1].group(0))
            at = found + len(earlier[-1].group(0)) if found >= 0 else None
        if at is not None and turn.startswith(tail, at) and at + len(tail) <= own[0].start():
            start = at + len(tail)
        else:  # the previous message renders differently when last (Hermes-3's tool message): find the header
            plain = self._render(marked_messages[:i], tools)
            header = prompt[len(plain) :] if prompt.startswith(plain) else ""
            found = turn.rfind(header, 0, own[0].start()) if header else -1
            if found < 0:
                raise RowProblem(f"the tokenizer's chat_template does not render assistant messages[{i}] after its "
                                 "generation prompt; use a built-in template")  # fmt: skip
            start = found + len(header)
        return turn[start : own[0].start()], turn[own[-1].end() :]

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages, tools = conversation.messages, conversation.tools
        real = self._render(messages, tools)
        if f"Q{self.nonce}Z" in real:  # a row that contains our sentinel (practically never): no alignment
            raise RowProblem("the row contains the template's alignment marker; use a built-in template")
        marked_messages, values = self._mark(messages)
        marked = self._render(marked_messages, tools)
        pieces = self._align(marked, real, values)
        spans = []  # (real start, real end, message) of each assistant turn
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            own = [p for p in pieces if p.message == i]
            if not own:
                raise RowProblem(_NOT_PRINTED.format(i))
            lead, trail = self._output(marked_messages, i, tools)
            first, last = own[0].marked[0], own[-1].marked[1]
            if not marked.startswith(trail, last):
                raise RowProblem(f"the tokenizer's chat_template ends assistant messages[{i}] differently inside the "
                                 "conversation than as its last turn; use a built-in template")  # fmt: skip
            kept = next(
                n for n in range(min(len(lead), first), -1, -1) if marked[first - n : first] == lead[len(lead) - n :]
            )
            spans.append((_to_real(pieces, first - kept), _to_real(pieces, last + len(trail)), i))
        return _cut(real, spans, pieces, messages)


def _to_real(pieces: list[_Piece], marked_position: int) -> int:
    """A position of the marked rendering outside any sentinel, in the real rendering."""
    shift = 0
    for piece in pieces:
        if piece.marked[0] >= marked_position:
            break
        shift = piece.real[1] - piece.marked[1]
    return marked_position + shift


def _cut(real: str, spans: list[tuple[int, int, int]], pieces: list[_Piece], messages: list[dict]) -> list[Segment]:
    """Segments of `real`: assistant spans; each other message up to the end of its value; the rest GLUE."""
    ends = [(p.real[1], p.message) for p in pieces if messages[p.message]["role"] != "assistant"]
    events = sorted(spans + [(e, e, i) for e, i in ends])
    out, done = [], 0
    for start, end, i in events:
        role = messages[i]["role"]
        if role == "assistant":
            if start < done:
                raise RowProblem(f"assistant messages[{i}] overlaps the turn before it in the rendered text")
            out += [Segment(real[done:start], GLUE, -1), Segment(real[start:end], "assistant", i)]
            done = end
        elif end > done:
            out.append(Segment(real[done:end], role, i))
            done = end
    out.append(Segment(real[done:], GLUE, -1))
    return [s for s in out if s.text]
