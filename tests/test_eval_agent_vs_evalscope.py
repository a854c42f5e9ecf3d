"""Our agent metrics against EvalScope's packaged ToolBench-Static scorer (`tool_bench`), step by step.

AGREE: ToolBench-format (ReAct) steps on which both scorers must give the same value for every metric
EvalScope reports for the step (Plan.EM, Act.EM, F1, HalluRate, Rouge-L), hence the same averages.
DIFFER: one case per deliberate difference listed in the README's table (same ids, same example text):
the named metrics come out as the README says on each side, and every other metric still agrees.
EvalScope's scorer comes from tests/evalscope_reference.py (the pinned wheel, nothing installed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_swift.eval.agent_metrics import parse_turn, score_agent, tool_names
from tests.evalscope_reference import toolbench_scorer

TOOLS = ("get_weather", "search", "book_flight", "Finish")  # ToolBench-Static lists Finish among the tools
README = Path(__file__).resolve().parents[1] / "README.md"
# EvalScope's per-step keys -> our summary keys (its Easy_F1 / Hard_F1 split has no counterpart here).
SUMMARY_KEYS = {
    "plan_em": "plan_em",
    "Act.EM": "act_em",
    "F1": "argument_f1",
    "HalluRate": "hallucination_rate",
    "Rouge-L": "rouge_l",
}
LABELS = {"plan_em": "Plan.EM", "Act.EM": "Act.EM", "F1": "F1", "HalluRate": "Hallu", "Rouge-L": "Rouge-L"}
DROPPED = "step dropped"  # EvalScope returned no metrics: the step does not count at all


def react(name: str, arguments, thought: str | None = None) -> str:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ("" if thought is None else f"Thought: {thought}\n") + f"Action: {name}\nAction Input: {raw}"


def answer(text) -> str:
    return react("Finish", {"return_type": "give_answer", "final_answer": text})


PARIS = react("get_weather", {"city": "Paris"})
GIVE_UP = react("Finish", {"return_type": "give_up_and_restart"})  # ToolBench's give-up
GIVE_UP_SHORT = react("Finish", {"return_type": "give_up"})
CAPITAL = answer("the capital of france is paris")
SEARCH_2 = react("search", {"query": "weather Paris", "limit": 5})


@dataclass(frozen=True)
class Case:
    reference: str
    prediction: str
    tools: tuple[str, ...] = TOOLS


AGREE = {
    # --- the reference calls a tool ---
    "exact call": Case(PARIS, PARIS),
    "ToolBench layout, multi-line input": Case(
        'Thought: \nAction: search\nAction Input: {\n  "query": "venues"\n}',
        react("search", {"query": "venues"}, thought="I should search."),
    ),
    "other listed tool": Case(PARIS, react("search", {"query": "Paris"})),
    "hallucinated tool": Case(PARIS, react("get_forecast", {"city": "Paris"})),
    "missing key": Case(SEARCH_2, react("search", {"query": "weather Paris"})),
    "one value differs": Case(SEARCH_2, react("search", {"query": "Paris weather", "limit": 5})),
    "extra key": Case(SEARCH_2, react("search", {"query": "weather Paris", "limit": 5, "lang": "en"})),
    "no key matches": Case(SEARCH_2, react("search", {"q": "x"})),
    "string for a number": Case(react("search", {"limit": 5}), react("search", {"limit": "5"})),
    "5.0 equals 5": Case(react("search", {"limit": 5}), react("search", {"limit": 5.0})),
    "nested value, other key order": Case(
        react("search", {"filters": {"a": 1, "b": [1, 2]}}), react("search", {"filters": {"b": [1, 2], "a": 1}})
    ),
    "empty arguments both": Case(react("book_flight", {}), react("book_flight", {})),
    "empty reference, arguments given": Case(react("book_flight", {}), react("book_flight", {"date": "today"})),
    "no Action Input vs empty reference": Case(react("book_flight", {}), "Action: book_flight"),
    "no Action Input vs arguments": Case(PARIS, "Action: get_weather"),
    "empty Action Input vs empty reference": Case(react("book_flight", {}), "Action: book_flight\nAction Input:"),
    "prediction arguments not JSON": Case(PARIS, react("get_weather", "city=Paris")),
    "prediction arguments truncated": Case(PARIS, react("get_weather", '{"city": "Par')),
    "prediction arguments a JSON list": Case(PARIS, react("get_weather", '["Paris"]')),
    "observation made up after the input": Case(PARIS, PARIS + "\nObservation: sunny"),
    "two actions, the last counts": Case(PARIS, react("search", {"query": "x"}) + "\nObservation: ...\n" + PARIS),
    "name padded with spaces": Case(PARIS, 'Action:   get_weather  \nAction Input: {"city": "Paris"}'),
    "gives up on a call step": Case(PARIS, GIVE_UP),
    "answers on a call step": Case(PARIS, CAPITAL),
    # Item 7: a reference Action Input that is not JSON leaves the step out of F1 (Act.EM still counts).
    "reference arguments not JSON": Case(react("search", "weather in Paris"), react("search", {"query": "Paris"})),
    "reference and prediction arguments not JSON": Case(react("search", "Paris"), react("search", "Paris")),
    "reference Action Input empty": Case("Action: book_flight\nAction Input:", react("book_flight", {})),
    "unlisted reference tool, prediction gives up": Case(react("spott", {"is_id": "city center"}), GIVE_UP),
    # --- the reference is a final answer ---
    "same answer": Case(CAPITAL, CAPITAL),
    "answer reordered": Case(CAPITAL, answer("paris is the capital of france")),
    "answer shortened": Case(CAPITAL, answer("paris")),
    "multi-line answer": Case(answer("sunny\nand warm"), answer("sunny and warm today")),
    "numeric answer": Case(answer("42"), answer(42)),
    "no common word": Case(CAPITAL, answer("i do not know")),
    "give_answer without final_answer": Case(CAPITAL, react("Finish", {"return_type": "give_answer"})),
    "calls a tool instead": Case(CAPITAL, react("search", {"query": "capital of france"})),
    "calls a hallucinated tool instead": Case(CAPITAL, react("lookup_capital", {"country": "France"})),
    "gives up instead of answering": Case(CAPITAL, GIVE_UP),
    # --- the reference gives up (item 6: ToolBench's give_up_and_restart and our earlier give_up) ---
    "give_up_and_restart both": Case(GIVE_UP, GIVE_UP),
    "give_up_and_restart vs give_up": Case(GIVE_UP, GIVE_UP_SHORT),
    "give_up vs give_up_and_restart": Case(GIVE_UP_SHORT, GIVE_UP),
}


@dataclass(frozen=True)
class Difference:
    """One README row: EvalScope's and our values of the metrics that differ (None: not reported)."""

    case: Case
    evalscope: dict | str  # or DROPPED, then `ours` gives every metric of the step
    ours: dict


DIFFER = {
    "D1": Difference(Case(PARIS, "It is sunny in Paris."), {"plan_em": 1.0}, {"plan_em": 0.0}),
    "D2": Difference(
        Case(PARIS, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        {"Act.EM": 0.0, "F1": 0.0},
        {"Act.EM": 1.0, "F1": 1.0},
    ),
    "D3": Difference(
        Case(react("spott", {"is_id": "city center"}), react("spott", {"is_id": "city center"})),
        DROPPED,
        {"plan_em": 1.0, "Act.EM": 1.0, "F1": 1.0, "HalluRate": 1},
    ),
    "D4": Difference(
        Case(react("invalid_hallucination_function_name", {}), GIVE_UP_SHORT),
        DROPPED,
        {"plan_em": 0.0, "Act.EM": 0.0, "F1": 0.0, "HalluRate": 0},
    ),
    "D5": Difference(Case(GIVE_UP, react("search", {"query": "x"})), DROPPED, {"plan_em": 0.0, "HalluRate": 0}),
    "D6": Difference(
        Case(answer("sunny"), answer("sunny"), tools=("get_weather", "search")),
        DROPPED,
        {"plan_em": 1.0, "HalluRate": 0, "Rouge-L": 1.0},
    ),
    "D7": Difference(Case(GIVE_UP, react("Finish", {"final_answer": "42"})), {"plan_em": 1.0}, {"plan_em": 0.0}),
    "D8": Difference(Case(react("search", "weather in Paris"), PARIS), {"F1": 0.0}, {"F1": None}),
    "D9": Difference(Case(react("search", ["weather"]), react("search", ["weather"])), {"F1": 0.0}, {"F1": None}),
    "D10": Difference(Case(answer("Sunny."), answer("sunny")), {"Rouge-L": 0.0}, {"Rouge-L": 1.0}),
    "D11": Difference(Case(answer("none"), react("search", {"query": "x"})), {"Rouge-L": 1.0}, {"Rouge-L": 0.0}),
    "D12": Difference(Case(answer("None"), answer("")), {"Rouge-L": 1.0}, {"Rouge-L": 0.0}),
    "D13": Difference(
        Case(PARIS, 'I call Action: get_weather\nAction Input: {"city": "Paris"}'),
        {"plan_em": 1.0, "Act.EM": 1.0, "F1": 1.0},
        {"plan_em": 0.0, "Act.EM": 0.0, "F1": 0.0},
    ),
    "D14": Difference(
        Case(PARIS, 'Action: get_weather\nThought: Paris it is\nAction Input: {"city": "Paris"}'),
        {"Act.EM": 0.0, "F1": 0.0, "HalluRate": 1},
        {"Act.EM": 1.0, "F1": 1.0, "HalluRate": 0},
    ),
    "D15": Difference(
        Case(PARIS, "Action:\nAction Input: {}"), {"plan_em": 1.0, "HalluRate": 1}, {"plan_em": 0.0, "HalluRate": 0}
    ),
}


def _tools(case: Case) -> list[dict]:
    return [{"name": name} for name in case.tools]  # ToolBench-Static's tool entries (descriptions omitted)


def _tool_names(case: Case) -> set[str]:
    return tool_names(_tools(case))


def evalscope_step(case: Case) -> dict:
    """EvalScope's metrics for one step ({} when it drops the step), without its Easy/Hard F1 split."""
    data = {"target": case.reference, "predictions": case.prediction, "tools": _tools(case)}
    return {k: v for k, v in toolbench_scorer().calculate_metrics(data).items() if k in SUMMARY_KEYS}


def our_step(case: Case) -> dict:
    """Our metrics for one step, under EvalScope's keys; a metric that does not apply is absent."""
    step = score_agent([case.prediction], [parse_turn(case.reference)], [_tool_names(case)]).per_step[0]
    metrics = {"plan_em": float(step["plan"] == step["reference_plan"]), "HalluRate": int(step["hallucinated"])}
    if "action_match" in step:
        metrics["Act.EM"] = float(step["action_match"])
    if step.get("argument_f1") is not None:
        metrics["F1"] = step["argument_f1"]
    if "rouge_l" in step:
        metrics["Rouge-L"] = step["rouge_l"]
    return metrics


@pytest.mark.parametrize("name", AGREE)
def test_each_step_agrees_with_evalscope(name):
    case = AGREE[name]
    expected = evalscope_step(case)
    assert expected, "EvalScope drops this step: it is a difference, not an agreeing case"
    assert parse_turn(case.reference).plan != "invalid"
    assert our_step(case) == expected


def test_averages_agree_with_evalscope():
    cases = list(AGREE.values())
    theirs = [evalscope_step(case) for case in cases]
    ours = score_agent(
        [c.prediction for c in cases], [parse_turn(c.reference) for c in cases], [_tool_names(c) for c in cases]
    ).summary()
    for key, summary_key in SUMMARY_KEYS.items():
        values = [step[key] for step in theirs if key in step]  # EvalScope's `mean`: over the steps that report it
        assert ours[summary_key] == sum(values) / len(values), key
    assert ours["f1_steps"] == sum("F1" in step for step in theirs) < ours["call_steps"]


def _readable(metrics: dict | str) -> str:
    if metrics == DROPPED:
        return DROPPED
    return ", ".join(f"{LABELS[k]} {'left out' if v is None else f'{v:g}'}" for k, v in metrics.items())


@pytest.mark.parametrize("name", DIFFER)
def test_each_documented_difference(name):
    difference = DIFFER[name]
    theirs, ours = evalscope_step(difference.case), our_step(difference.case)
    if difference.evalscope == DROPPED:
        assert theirs == {}
        assert ours == difference.ours  # every metric of the step, as the README row says
        return
    differing = difference.evalscope.keys() | difference.ours.keys()
    assert {k: theirs.get(k) for k in differing} == difference.evalscope
    assert {k: ours.get(k) for k in differing} == difference.ours
    assert {k: v for k, v in theirs.items() if k not in differing} == {
        k: v for k, v in ours.items() if k not in differing
    }, "only the documented metrics may differ"


def test_readme_lists_exactly_the_tested_differences():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (D\d+) \|.*$", README.read_text(), re.MULTILINE)}
    assert list(rows) == list(DIFFER)
    for name, difference in DIFFER.items():
        case, row = difference.case, rows[name]
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        example = f"`{case.reference}` → `{case.prediction}`".replace("\n", "\\n")
        if case.tools != TOOLS:
            example += f" (tools: {', '.join(case.tools)})"
        assert cells[2:] == [example, _readable(difference.evalscope), _readable(difference.ours)], name
