"""Shared inputs for the data-pipeline tests: tokenizers with real model-family chat templates, conversations."""

from __future__ import annotations

import json
from pathlib import Path

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # Qwen2.5-Instruct's chat template (tools: Hermes style)  # noqa: E501

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)  # Meta-Llama-3-Instruct's chat template

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)  # Mistral-7B-Instruct-v0.1's chat template, without its role-alternation check


def tokenizer_with(template: str, special: tuple[str, ...] = (), **tokens):
    """The tiny test tokenizer with extra special tokens and another chat template."""
    from megatron_swift.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    if special:
        tokenizer.add_tokens(list(special), special_tokens=True)
    for name, value in tokens.items():
        setattr(tokenizer, name, value)
    tokenizer.chat_template = template
    return tokenizer


def qwen_tokenizer():
    return tokenizer_with(QWEN25_TEMPLATE)


def llama3_tokenizer():
    special = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    return tokenizer_with(LLAMA3_TEMPLATE, special, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def mistral_tokenizer():
    return tokenizer_with(MISTRAL_TEMPLATE, ("<s>", "</s>"), bos_token="<s>", eos_token="</s>")


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {**CITY, "required": ["city"]}}}  # fmt: skip
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time in a city", "parameters": CITY},
}


def _call(name: str, arguments, as_string: bool = False) -> dict:
    return {
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
    weather = _call("get_weather", {"city": "Paris"})
    clock = _call("get_time", {"city": "Paris"}, as_string=True)
    result = [{"role": "tool", "content": '{"sky": "sunny"}'}]
    final = {"role": "assistant", "content": "Sunny, and it is noon."}
    calling = {"role": "assistant", "content": "", "tool_calls": [weather]}
    return [
        {"tools": [WEATHER], "messages": [user, calling, *result, final]},
        {"tools": [WEATHER, CLOCK], "messages": [{"role": "system", "content": "Use tools."}, user,
            {"role": "assistant", "content": None, "tool_calls": [weather, clock]}, *result,
            {"role": "tool", "content": "12:00"}, final]},
        {"tools": [WEATHER], "messages": [user, {**calling, "content": "Let me check."}, *result, final,
                                          {"role": "user", "content": "Thanks!"},
                                          {"role": "assistant", "content": "You are welcome."}]},
        {"tools": [CLOCK], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"tools": [WEATHER, CLOCK], "messages": [{"role": "system", "content": "Be terse."}, user,
            {"role": "assistant", "content": "", "tool_calls": [clock]}, {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "", "tool_calls": [weather]}, *result, final]},
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path
