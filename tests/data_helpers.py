"""Shared inputs for the data-pipeline tests: tiny tokenizers and conversations (real templates: references.py)."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_tokenizer_with(*special: str, **tokens):
    """The tiny test tokenizer with extra special tokens (for the built-in templates, which need no Jinja)."""
    from megatron_swift.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(list(special), special_tokens=True)
    for name, value in tokens.items():
        setattr(tokenizer, name, value)
    return tokenizer


def chatml_tokenizer():
    return tiny_tokenizer_with("<|im_start|>", "<|im_end|>")


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {**CITY, "required": ["city"]}}}  # fmt: skip
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time in a city", "parameters": CITY},
}


def _call(name: str, arguments, call_id: str, as_string: bool = False) -> dict:
    return {
        "id": call_id,  # 9 characters: Mistral-Nemo's template requires it
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments},
    }


def chat_conversations() -> list[dict]:
    """Plain chats (no tools): single and multi-turn, with and without system, unicode, spacing."""
    questions = ["What is the capital of France?", "Numbers 1 2 3?", "Fine-tuning, briefly.", "Ça va? 你好",
                 "  leading and trailing spaces  ", "Two\nlines"]  # fmt: skip
    answers = ["Paris.", "4 5 6", "A small learning rate.", "Très bien — 好", " spaced ", "One\n\nTwo"]
    rows = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        system = [{"role": "system", "content": f"You are assistant number {i}."}]
        rows.append({"messages": [*system, {"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"},
                                  {"role": "assistant", "content": answers[(i + 1) % len(answers)]}]})  # fmt: skip
    return rows


def tool_conversations() -> list[dict]:
    """Agent chats: tool schemas, single / parallel tool calls (dict or JSON-string arguments), tool results."""
    user = {"role": "user", "content": "Weather and time in Paris?"}
    weather = _call("get_weather", {"city": "Paris"}, "wthr00001")
    clock = _call("get_time", {"city": "Paris"}, "time00002", as_string=True)
    result = [{"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "wthr00001"}]
    time = {"role": "tool", "content": "12:00", "tool_call_id": "time00002"}
    final = {"role": "assistant", "content": "Sunny, and it is noon."}
    calling = {"role": "assistant", "content": "", "tool_calls": [weather]}
    return [
        {"tools": [WEATHER], "messages": [user, calling, *result, final]},
        {"tools": [WEATHER, CLOCK], "messages": [{"role": "system", "content": "Use tools."}, user,
            {"role": "assistant", "content": None, "tool_calls": [weather, clock]}, *result, time, final]},
        {"tools": [WEATHER], "messages": [user, {**calling, "content": "Let me check."}, *result, final,
                                          {"role": "user", "content": "Thanks!"},
                                          {"role": "assistant", "content": "You are welcome."}]},
        {"tools": [CLOCK], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"tools": [WEATHER, CLOCK], "messages": [{"role": "system", "content": "Be terse."}, user,
            {"role": "assistant", "content": "", "tool_calls": [clock]}, time,
            {"role": "assistant", "content": "", "tool_calls": [weather]}, *result, final]},
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def preference_data(*datasets, **options):
    """The DataSection the preference / KTO data tests build from: 96-token rows, file order kept."""
    from megatron_swift.training.config import DataSection

    return DataSection(dataset=[str(d) for d in datasets], **{"seq_length": 96, "shuffle": False, **options})
