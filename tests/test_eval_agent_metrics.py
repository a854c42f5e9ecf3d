"""Agent metrics on a hand-built set of 35 steps whose expected values are worked out by hand below.

Each case is (reference, prediction, what the step contributes), with the definitions of
megatron_swift/eval/agent_metrics.py. Tool list of every step: get_weather, search, book_flight.
"""

from __future__ import annotations

import json

import pytest

from megatron_swift.eval.agent_metrics import INVALID, ToolCall, argument_f1, parse_turn, score_agent, tool_names

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {}}},  # OpenAI style
    {"name": "search"},  # plain style
    {"type": "function", "function": {"name": "book_flight"}},
]


def hermes(*calls) -> str:
    """Our agent template: one <tool_call> block per (name, arguments)."""
    return "\n".join(
        f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>" for name, args in calls
    )


def react(name: str, raw_input: str) -> str:
    return f"Thought: let me think.\nAction: {name}\nAction Input: {raw_input}"


PARIS = ("get_weather", {"city": "Paris"})
ROME = ("get_weather", {"city": "Rome"})
CAPITAL = "The capital of France is Paris."
GIVE_UP = react("Finish", json.dumps({"return_type": "give_up"}))

# (reference, prediction). Comments: plan match P, action match A, argument F1 F, hallucination H,
# Rouge-L R, invalid I. Only call steps have A and F; only finish steps have R.
CASES = [
    # --- call steps (24) ---
    (hermes(PARIS), hermes(PARIS)),  # 1  P1 A1 F1=1
    (hermes(PARIS), json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})),  # 2  plain JSON: P1 A1 F=1
    (
        hermes(PARIS),
        json.dumps({"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}),
    ),  # 3  OpenAI, string arguments: P1 A1 F=1
    (hermes(PARIS), react("get_weather", '{"city": "Paris"}')),  # 4  ReAct: P1 A1 F=1
    (hermes(PARIS), hermes(("search", {"query": "Paris"}))),  # 5  wrong (listed) tool: P1 A0 F=0 H0
    (hermes(PARIS), hermes(("get_forecast", {"city": "Paris"}))),  # 6  hallucinated tool: P1 A0 F=0 H1
    # 7  partial: ref {query, limit}, pred {query}: full=1, s=1, R=1/2, P=1/1 -> F = 2*(1/2)/(3/2) = 2/3
    (hermes(("search", {"query": "weather Paris", "limit": 5})), hermes(("search", {"query": "weather Paris"}))),
    # 8  one value differs: full=1 half=1, s=1.5, R=P=1.5/2=3/4 -> F = 3/4
    (
        hermes(("search", {"query": "weather Paris", "limit": 5})),
        hermes(("search", {"query": "Paris weather", "limit": 5})),
    ),
    # 9  extra key: full=2, s=2, R=2/2=1, P=2/3 -> F = 2*(2/3)/(5/3) = 4/5
    (hermes(("search", {"query": "x", "limit": 5})), hermes(("search", {"query": "x", "limit": 5, "lang": "en"}))),
    (hermes(("book_flight", {})), hermes(("book_flight", {}))),  # 10 empty reference args, empty pred: F=1
    (hermes(("book_flight", {})), hermes(("book_flight", {"date": "today"}))),  # 11 empty ref, non-empty pred: F=0, A1
    (hermes(PARIS), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'),  # 12 I: P0 A0
    (hermes(PARIS), '{"name": "get_weather", "arguments": {"city"'),  # 13 truncated JSON: I, P0 A0
    (hermes(PARIS), ""),  # 14 empty output: I, P0 A0
    (hermes(PARIS), "It is sunny in Paris."),  # 15 answered instead of calling: plan finish, P0 A0 F0
    (hermes(PARIS), "Action: get_weather\nAction Input: city=Paris"),  # 16 args not JSON: P1 A1 F=0
    (hermes(PARIS, ROME), hermes(PARIS, ROME)),  # 17 two calls, both right: A1, F=(1+1)/2=1
    (hermes(PARIS, ROME), hermes(PARIS)),  # 18 one of two: names differ A0, F=(1+0)/max(1,2)=1/2
    (hermes(PARIS), hermes(PARIS, ("search", {"query": "Paris"}))),  # 19 extra call: A0, F=1/max(2,1)=1/2, H0
    (hermes(PARIS), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # 20 unclosed: P1 A1 F=1
    # 21 one of two values differs: full=1 half=1, s=1.5, R=P=3/4 -> F = 3/4
    (
        hermes(("get_weather", {"city": "Paris", "units": "metric"})),
        hermes(("get_weather", {"city": "Paris", "units": "imperial"})),
    ),
    (hermes(("search", {"query": "q"})), react("web_search", '{"query": "q"}')),  # 22 hallucinated, ReAct: P1 A0 F0 H1
    (hermes(PARIS), "<tool_call>\n[1, 2]\n</tool_call>"),  # 23 block is not a call: I, P0 A0
    (hermes(PARIS), json.dumps({"name": "get_weather", "arguments": {"city": "paris"}})),  # 24 half: R=P=1/2, F=1/2, A1
    # --- finish steps (9) ---
    (CAPITAL, CAPITAL),  # 25 P1 R=1
    # 26 pred [paris is the capital of france] vs ref [the capital of france is paris]: LCS "the capital of
    #    france" = 4 (nothing extends it: after "is"/"paris" in one text the other has no common token) -> 2/3
    (CAPITAL, "Paris is the capital of France."),
    (CAPITAL, "Paris."),  # 27 LCS 1, P=1, R=1/6 -> 2*(1/6)/(7/6) = 2/7
    (CAPITAL, hermes(PARIS)),  # 28 called a tool instead: P0, R=0 (no answer), H0
    (
        CAPITAL,
        react("Finish", json.dumps({"return_type": "give_answer", "final_answer": "The capital of France is Paris"})),
    ),
    # ^ 29 ReAct final answer, same tokens: P1 R=1
    (CAPITAL, "I don't know."),  # 30 tokens [i don t know], LCS 0: P1 R=0
    (CAPITAL, "{not json"),  # 31 broken JSON: I, P0, R=0
    ("Sunny, 21 degrees.", "sunny 21 degrees"),  # 32 same tokens after lowercasing: P1 R=1
    (CAPITAL, react("lookup_capital", '{"country": "France"}')),  # 33 hallucinated call: P0 R=0 H1
    # --- give-up steps (2) ---
    (GIVE_UP, GIVE_UP),  # 34 P1
    (GIVE_UP, CAPITAL),  # 35 P0
]

# Plan: call steps match on 1-11, 16-22, 24 (19 of 24); finish on 25-27, 29, 30, 32 (6 of 9); give-up 34 (1 of 2).
EXPECTED_PLAN_EM = (19 + 6 + 1) / 35
# Action: 1-4, 7-11, 16, 17, 20, 21, 24 = 14 of the 24 call steps.
EXPECTED_ACT_EM = 14 / 24
# F1 sum: 1+1+1+1 (1-4) + 2/3 (7) + 3/4 (8) + 4/5 (9) + 1 (10) + 1 (17) + 1/2 (18) + 1/2 (19) + 1 (20) + 3/4 (21)
#         + 1/2 (24) = 10 + 2/3 + 4/5 = 172/15, over 24 call steps.
EXPECTED_ARGUMENT_F1 = (172 / 15) / 24
# Hallucinated tools: get_forecast (6), web_search (22), lookup_capital (33), over all 35 steps.
EXPECTED_HALLUCINATION = 3 / 35
# Rouge-L sum: 1 (25) + 2/3 (26) + 2/7 (27) + 1 (29) + 1 (32) = 3 + 20/21 = 83/21, over 9 finish steps.
EXPECTED_ROUGE_L = (83 / 21) / 9
# Unreadable predictions: 12, 13, 14, 23, 31.
EXPECTED_INVALID = 5 / 35


def test_hand_computed_metrics():
    assert len(CASES) == 35
    references = [parse_turn(reference) for reference, _ in CASES]
    assert INVALID not in references, "every reference must parse"
    scores = score_agent([p for _, p in CASES], references, [tool_names(TOOLS)] * len(CASES))
    summary = scores.summary()
    assert (summary["steps"], summary["call_steps"], summary["finish_steps"]) == (35, 24, 9)
    assert summary["plan_em"] == pytest.approx(EXPECTED_PLAN_EM, abs=1e-12)
    assert summary["act_em"] == pytest.approx(EXPECTED_ACT_EM, abs=1e-12)
    assert summary["argument_f1"] == pytest.approx(EXPECTED_ARGUMENT_F1, abs=1e-12)
    assert summary["hallucination_rate"] == pytest.approx(EXPECTED_HALLUCINATION, abs=1e-12)
    assert summary["rouge_l"] == pytest.approx(EXPECTED_ROUGE_L, abs=1e-12)
    assert summary["invalid_rate"] == pytest.approx(EXPECTED_INVALID, abs=1e-12)
    # Per-step detail for a few cases worked out above (1-based case numbers).
    assert scores.per_step[6]["argument_f1"] == pytest.approx(2 / 3)
    assert scores.per_step[8]["argument_f1"] == pytest.approx(4 / 5)
    assert scores.per_step[26]["rouge_l"] == pytest.approx(2 / 7)
    assert [i + 1 for i, s in enumerate(scores.per_step) if s["hallucinated"]] == [6, 22, 33]


def test_formats_parse_to_the_same_call():
    expected = (ToolCall("get_weather", {"city": "Paris"}),)
    for text in (
        hermes(PARIS),
        json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
        json.dumps([{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
        react("get_weather", '{"city": "Paris"}'),
    ):
        turn = parse_turn(text)
        assert (turn.plan, turn.calls) == ("call", expected), text


@pytest.mark.parametrize(
    "text",
    [None, 17, "", "   ", "{", "<tool_call>", "<tool_call></tool_call>", "Action:", "Action:\nAction Input:",
     "Action: Finish\nAction Input: nope", "Action: Finish\nAction Input: {}", '{"arguments": {}}', '{"name": 3}',
     "<tool_call>\n{\"name\": \"\"}\n</tool_call>"],
)  # fmt: skip
def test_unreadable_predictions_are_invalid_never_errors(text):
    assert parse_turn(text) == INVALID


def test_pathological_output_does_not_crash():
    assert parse_turn("{" + "[" * 100_000) == INVALID
    assert parse_turn("Action: f\nAction Input: " + "[" * 100_000).calls == (ToolCall("f", None),)
    assert parse_turn("\n" * 50_000 + "x").plan == "finish"


def test_text_starting_with_a_bracket_is_an_answer():
    assert parse_turn("[1] see the docs").plan == "finish"


def test_tool_names_and_no_call_steps():
    assert tool_names([*TOOLS, "junk", {"function": 3}]) == {"get_weather", "search", "book_flight"}
    summary = score_agent(["hi"], [parse_turn("hello there")], [set()]).summary()
    assert summary["act_em"] is None and summary["argument_f1"] is None and summary["rouge_l"] == 0.0


def test_toolbench_give_up_and_finish_inputs():
    give_up = parse_turn(react("Finish", json.dumps({"return_type": "give_up_and_restart"})))
    assert give_up.plan == "give_up" == parse_turn(GIVE_UP).plan
    no_answer = parse_turn(react("Finish", json.dumps({"return_type": "give_answer"})))
    assert (no_answer.plan, no_answer.answer) == ("finish", "")
    assert parse_turn(react("Finish", json.dumps({"return_type": "restart"}))) == INVALID
    assert parse_turn("Action: f").calls == (ToolCall("f", {}),)  # no Action Input: no arguments
    assert parse_turn("Action: f\nAction Input:").calls == (ToolCall("f", None),)  # an empty one is unreadable


def test_reference_arguments_not_json_leave_the_step_out_of_f1_only():
    references = [parse_turn(hermes(PARIS)), parse_turn(react("get_weather", "city=Paris"))]
    assert not references[1].arguments_readable
    # Both predictions name the right tool; the first also has the right arguments (F1 1), the second
    # would score 0 if its step counted.
    scores = score_agent([hermes(PARIS), hermes(ROME)], references, [tool_names(TOOLS)] * 2)
    summary = scores.summary()
    assert (summary["call_steps"], summary["f1_steps"]) == (2, 1)
    assert (summary["act_em"], summary["argument_f1"]) == (1.0, 1.0)
    assert scores.per_step[1]["argument_f1"] is None
    with pytest.raises(ValueError, match="leave its step out of F1"):  # never silently scored as `{}`
        argument_f1(ToolCall("get_weather", {}), references[1].calls[0])
