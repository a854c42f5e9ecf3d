"""Tool-calling (agent) metrics in the style of the ToolBench-Static leaderboard the SWIFT paper reports.

One *step* is one evaluation row: the tools offered, the conversation so far, and the reference next
assistant turn. A turn (reference or prediction) is parsed into a plan:

- `call`: one or more tool calls, each a name and a JSON object of arguments;
- `finish`: a final answer (plain text, or ReAct `Action: Finish` with `return_type: give_answer`; its
  `final_answer`, or the empty answer when it has none);
- `give_up`: ReAct `Action: Finish` with `return_type` `give_up_and_restart` (ToolBench's value) or `give_up`;
- `invalid`: text that looks like a tool call but cannot be read (never matches anything), including an
  `Action: Finish` whose input is not a JSON object with one of those return types.

Tool calls are read in these formats, first match wins:

1. our agent template (Hermes / Qwen2.5): `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`,
   one block per call (an unclosed last block is accepted: generation may stop at EOS);
2. ReAct: `Action: N` then `Action Input: {...}` (the last `Action:` line and the input after it; no
   `Action Input:` at all means `{}`, an empty one is unreadable);
3. plain JSON: `{"name": N, "arguments": ...}`, OpenAI `{"function": {"name": N, "arguments": "..."}}`,
   or a list of those. Arguments given as a JSON string are decoded.

Anything else is a final answer, except text that starts with `{` (a broken JSON call). A
prediction that starts a tool call but cannot be decoded is `invalid`; arguments that are not a
JSON object keep the call (its name counts) with unreadable arguments (argument F1 0). Nothing here
raises. A reference is read the same way: one that is `invalid` cannot be scored (the suite counts and
skips it), and a reference call whose arguments are unreadable leaves its step out of argument F1.

Metrics over N steps (C = steps whose reference plan is `call`, F = steps whose reference plan is
`finish`); all are fractions in [0, 1]:

- **Plan.EM** = (1/N) * #{steps: plan(prediction) == plan(reference)}.
- **Act.EM** = (1/|C|) * #{call steps: the predicted tool names, in order, equal the reference names}.
- **Argument F1** = (1/|A|) * sum over A of the step F1, A = the call steps whose reference arguments
  are all JSON objects (`f1_steps` of them). Calls are paired by position; the step F1 is the sum of
  the pair scores divided by max(#reference calls, #predicted calls) (a missing or extra call scores 0).
  A pair scores 0 if the names differ or the predicted arguments are unreadable; if the reference
  arguments are `{}` it scores 1 when the prediction's are `{}` too, else 0; otherwise, with `full` =
  reference keys present in the prediction with an equal value and `half` = reference keys present
  with another value, `s = full + 0.5 * half`, recall = s / #reference keys, precision = s /
  #predicted keys, score = 2PR / (P + R) (0 if s = 0).
- **Hallucination rate** = (1/N) * #{steps whose prediction calls a tool that is not in that step's
  tool list}.
- **Rouge-L** = (1/|F|) * sum over finish steps of the ROUGE-L F1 between the predicted answer (the
  empty string if the prediction is not a final answer) and the reference answer: texts are
  lowercased and split into `\\w+` tokens, L = longest common subsequence, P = L / #predicted tokens,
  R = L / #reference tokens, F1 = 2PR / (P + R) (0 if L = 0).

Act.EM is None when there is no call step, argument F1 when A is empty, Rouge-L when there is no finish step.

Alignment: on ReAct text these are the ToolBench-Static metrics (the α-UMi evaluation the SWIFT paper
reports; EvalScope's `tool_bench`), step for step and averaged the same way; tests/test_eval_agent_vs_evalscope.py
checks that against EvalScope's packaged scorer, and the README lists each deliberate difference with an
example (e.g. ours reads more formats and several calls per step, lowercases `\\w+` tokens for Rouge-L,
and keeps steps EvalScope drops: references naming an unlisted tool, give-up references).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PLANS = ("call", "finish", "give_up")
GIVE_UP_RETURN_TYPES = ("give_up_and_restart", "give_up")  # ToolBench's value, and the short form we accepted first
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_REACT_ACTION = re.compile(r"^[ \t]*Action[ \t]*:", re.MULTILINE)  # within a line: no backtracking across lines
_TOKEN = re.compile(r"\w+")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict | None  # None: the arguments were not a JSON object


@dataclass(frozen=True)
class Turn:
    plan: str  # call / finish / give_up / invalid
    calls: tuple[ToolCall, ...] = ()
    answer: str = ""

    @property
    def arguments_readable(self) -> bool:
        """Whether every call's arguments are a JSON object (a reference that is not leaves F1 out)."""
        return all(call.arguments is not None for call in self.calls)


INVALID = Turn("invalid")


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: pathologically nested output
        return None
    return value if isinstance(value, dict) else None


def _arguments(value) -> dict | None:
    if value is None:
        return {}
    if isinstance(value, str):  # OpenAI encodes arguments as a JSON string ("" for none)
        return _json_object(value) if value.strip() else {}
    return value if isinstance(value, dict) else None


def _call_from_json(obj) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI tool_calls entry
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    return ToolCall(name.strip(), _arguments(obj.get("arguments", obj.get("parameters"))))


def _json_calls(text: str) -> tuple[ToolCall, ...] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_json(item) for item in items]
    return tuple(calls) if calls and all(calls) else None


def _react(text: str) -> Turn:
    last_action = list(_REACT_ACTION.finditer(text))[-1]
    rest = text[last_action.end() :]
    name, _, after = rest.partition("\n")
    name = name.strip()
    marker = after.find("Action Input:")
    if not name:
        return INVALID
    # No `Action Input:` is a call without arguments; one with nothing after it is unreadable, as in ToolBench.
    arguments = _json_object(after[marker + len("Action Input:") :].strip()) if marker >= 0 else {}
    if name == "Finish":
        return_type = arguments.get("return_type") if arguments is not None else None
        if return_type in GIVE_UP_RETURN_TYPES:
            return Turn("give_up")
        if return_type != "give_answer":
            return INVALID
        answer = arguments.get("final_answer")
        return Turn("finish", answer="" if answer is None else str(answer))
    return Turn("call", (ToolCall(name, arguments),))


def parse_turn(text) -> Turn:
    """Read one assistant turn; never raises (an unreadable tool call is `INVALID`)."""
    if not isinstance(text, str) or not text.strip():
        return INVALID
    text = text.strip()
    if "<tool_call>" in text:
        calls = [_json_calls(block.strip()) for block in _HERMES_BLOCK.findall(text)]
        if not calls or any(c is None or len(c) != 1 for c in calls):
            return INVALID
        return Turn("call", tuple(c[0] for c in calls))
    if _REACT_ACTION.search(text):
        return _react(text)
    calls = _json_calls(text) if text[0] in "{[" else None
    if calls:
        return Turn("call", calls)
    if text[0] == "{":  # a JSON object that is not a readable tool call
        return INVALID
    return Turn("finish", answer=text)


def argument_f1(predicted: ToolCall, reference: ToolCall) -> float:
    """Score of one predicted call against one reference call whose arguments are readable (module docstring)."""
    if reference.arguments is None:
        raise ValueError(f"reference call {reference.name!r} has unreadable arguments: leave its step out of F1")
    if predicted.name != reference.name or predicted.arguments is None:
        return 0.0
    ref_args, pred_args = reference.arguments, predicted.arguments
    if not ref_args:
        return 1.0 if not pred_args else 0.0
    full = sum(1 for k, v in ref_args.items() if k in pred_args and pred_args[k] == v)
    half = sum(1 for k, v in ref_args.items() if k in pred_args and pred_args[k] != v)
    score = full + 0.5 * half
    if score == 0:
        return 0.0
    recall, precision = score / len(ref_args), score / len(pred_args)
    return 2 * recall * precision / (recall + precision)


def step_argument_f1(predicted: Turn, reference: Turn) -> float:
    pairs = zip(predicted.calls, reference.calls, strict=False)  # a non-call prediction has no calls: score 0
    return sum(argument_f1(p, r) for p, r in pairs) / max(len(predicted.calls), len(reference.calls))


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = _TOKEN.findall(prediction.lower()), _TOKEN.findall(reference.lower())
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)  # LCS by dynamic programming, one row at a time
    for token in pred:
        current = [0]
        for j, ref_token in enumerate(ref):
            current.append(previous[j] + 1 if token == ref_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def tool_names(tools) -> set[str]:
    """Names from `[{"name": ..}]` or OpenAI `[{"type": "function", "function": {"name": ..}}]`."""
    names = set()
    for tool in tools:
        entry = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.add(entry["name"])
    return names


@dataclass
class AgentScores:
    steps: int = 0
    call_steps: int = 0
    f1_steps: int = 0  # call steps whose reference arguments are readable: F1's denominator
    finish_steps: int = 0
    invalid_predictions: int = 0
    plan_matches: int = 0
    action_matches: int = 0
    argument_f1_sum: float = 0.0
    hallucinations: int = 0
    rouge_l_sum: float = 0.0
    per_step: list[dict] = field(default_factory=list)

    def add(self, prediction_text: str, reference: Turn, tools: set[str]) -> None:
        predicted = parse_turn(prediction_text)
        step = {"plan": predicted.plan, "reference_plan": reference.plan}
        self.steps += 1
        self.invalid_predictions += predicted.plan == "invalid"
        self.plan_matches += predicted.plan == reference.plan
        hallucinated = any(call.name not in tools for call in predicted.calls)
        self.hallucinations += hallucinated
        step["hallucinated"] = hallucinated
        if reference.plan == "call":
            self.call_steps += 1
            action_match = [c.name for c in predicted.calls] == [c.name for c in reference.calls]
            self.action_matches += action_match
            f1 = step_argument_f1(predicted, reference) if reference.arguments_readable else None
            if f1 is not None:
                self.f1_steps += 1
                self.argument_f1_sum += f1
            step.update(action_match=action_match, argument_f1=f1)
        elif reference.plan == "finish":
            self.finish_steps += 1
            score = rouge_l(predicted.answer if predicted.plan == "finish" else "", reference.answer)
            self.rouge_l_sum += score
            step["rouge_l"] = score
        self.per_step.append(step)

    def summary(self) -> dict:
        def ratio(total, count):
            return total / count if count else None

        return {
            "steps": self.steps,
            "call_steps": self.call_steps,
            "finish_steps": self.finish_steps,
            "f1_steps": self.f1_steps,
            "plan_em": ratio(self.plan_matches, self.steps),
            "act_em": ratio(self.action_matches, self.call_steps),
            "argument_f1": ratio(self.argument_f1_sum, self.f1_steps),
            "hallucination_rate": ratio(self.hallucinations, self.steps),
            "rouge_l": ratio(self.rouge_l_sum, self.finish_steps),
            "invalid_rate": ratio(self.invalid_predictions, self.steps),
        }


def score_agent(predictions: list[str], references: list[Turn], tools: list[set[str]]) -> AgentScores:
    """Score predictions (raw model text) against parsed references, with each step's tool names."""
    if not len(predictions) == len(references) == len(tools):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = AgentScores()
    for prediction, reference, names in zip(predictions, references, tools, strict=True):
        scores.add(prediction, reference, names)
    return scores
