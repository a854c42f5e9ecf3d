"""Prompt rows, batched greedy generation (transformers, or vLLM on a GPU) and question-answer accuracy.

A row is `{"question": Q, "answer": A}` or `{"messages": [...]}` whose last message is the reference
assistant turn (the SFT format), optionally with `"tools"` (passed to the chat template) and a
precomputed `"prediction"`. Prompts are rendered with the model's chat template and a generation
prompt; both backends get the same token ids, so they differ only in their kernels.

Accuracy: exact match compares the stripped texts; the normalised match first lowercases, drops
punctuation and the articles a/an/the, and collapses whitespace (SQuAD's normalisation).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_swift.data.errors import BadRows, RowProblem
from megatron_swift.eval.loading import EvalInputError

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptRow:
    where: str  # file:line, for messages
    messages: list[dict]  # the prompt conversation
    reference: str
    tools: list | None = None
    prediction: str | None = None


def _row(where: str, row: dict) -> PromptRow:
    """The row as a PromptRow; raises RowProblem (without the file:line, which the caller adds) if malformed."""
    if "question" in row:
        messages, reference = [{"role": "user", "content": row["question"]}], row.get("answer")
    else:
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            raise RowProblem("a row needs 'question' + 'answer', or 'messages' ending in the reference")
        messages, reference = messages[:-1], messages[-1]
        if not isinstance(reference, dict) or reference.get("role") != "assistant":
            raise RowProblem("the last message must be the reference assistant turn")
        reference = reference.get("content")
    if not isinstance(reference, str):
        raise RowProblem("the reference answer must be a string")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RowProblem(f"messages[{i}] needs a role of {'/'.join(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise RowProblem(f"messages[{i}].content must be a string")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RowProblem("'tools' must be a list")
    prediction = row.get("prediction")
    if prediction is not None and not isinstance(prediction, str):
        raise RowProblem("'prediction' must be a string")
    return PromptRow(where, messages, reference, tools, prediction)


def read_prompt_rows(path: str | Path, bad: BadRows | None = None) -> list[PromptRow]:
    """The well-formed rows of a JSONL file, read before any model work. A malformed row raises DataError
    naming file:line, or with `bad.skip` is counted in `bad` and left out."""
    from megatron_swift.data import read_jsonl

    bad = bad if bad is not None else BadRows(option="--skip-bad-rows")
    rows = []
    for number, data in read_jsonl(path, bad):
        try:
            rows.append(_row(f"{path}:{number}", data))
        except RowProblem as exc:
            bad.report(f"{path}:{number}", str(exc))
    return rows


def render_prompt(tokenizer, row: PromptRow) -> list[int]:
    kwargs = {"tools": row.tools} if row.tools else {}
    ids = tokenizer.apply_chat_template(row.messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded in batches; special tokens are dropped."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        width = max(len(p) for p in group)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
    return texts


def vllm_engine(model_dir, tensor_parallel_size: int = 1):
    """vLLM's offline engine for `model_dir` (needs vllm and a CUDA GPU; says which is missing)."""
    from megatron_swift._optional import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        raise EvalInputError(f"--backend vllm: {reason}; use --backend hf")
    import vllm

    return vllm.LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel_size)


def generate_vllm(engine, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """The same greedy continuations as `generate_hf`, through a vLLM engine."""
    import vllm

    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [out.outputs[0].text for out in outputs]


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_accuracy(predictions: list[str], references: list[str]) -> dict:
    pairs = list(zip(predictions, references, strict=True))
    exact = sum(p.strip() == r.strip() for p, r in pairs)
    normalised = sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs)
    return {"rows": len(pairs), "exact_match": exact / len(pairs), "normalized_match": normalised / len(pairs)}
