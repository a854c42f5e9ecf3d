"""Synthetic tool-use conversations in ToolBench-Static style, for the agent-training example.

A pool of tool schemas (OpenAI function format, typed arguments: string, integer, number, boolean, enum) in
domains; each conversation offers one domain's tools and is one of: a single call, two dependent calls (the
second's argument comes from the first's response), two independent calls, a tool error the assistant gives up
on, or a request no offered tool serves (give up at once). Assistant turns are ReAct text, which
megatron_swift/eval/agent_metrics.py reads: `Action: NAME` + `Action Input: {json}`, and `Action: Finish` with
`{"return_type": "give_answer", "final_answer": ...}` or `{"return_type": "give_up_and_restart"}`; tool results
are `tool` messages. The offered tools are also listed in the system message (the tiny models' ChatML template
does not render `tools`), so the prompt a model sees in training and in `mswift-eval` is the same.

Domains are split: in-domain ones give the training set and an in-domain test set (new values), held-out ones
an out-of-domain test set with tools never seen in training. Test sets are one row per assistant step (the
conversation so far + the reference next turn + `tools`), the format `mswift-eval --agent` scores.

    python -m megatron_swift.data.synthetic_agent --out DIR [--train 1200] [--test 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "Call a tool with Action and Action Input (JSON), or Action: Finish to answer or give up. Tools:"

CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Seoul", "Quito", "Lisbon",
          "Vienna", "Prague", "Nairobi", "Denver", "Austin", "Mumbai", "Hanoi", "Sydney"]  # fmt: skip
NAMES = ["Alice", "Bob", "Chen", "Dana", "Eva", "Farid", "Gina", "Hugo", "Ines", "Jon", "Kira", "Liam", "Mona", "Nils"]
DATES = [f"2025-{m:02d}-{d:02d}" for m in (3, 4, 5, 6) for d in (2, 9, 14, 21, 27)]
TICKERS = ["ACME", "BOLT", "CRUX", "DYNA", "ECHO", "FLUX", "GRID", "HALO"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "INR"]
DISHES = ["lasagna", "ramen", "paella", "curry", "falafel", "risotto", "tacos", "goulash", "pho", "chili"]
ARTISTS = ["Nova", "Orbit", "Pulse", "Quill", "Rivet", "Sable", "Tango", "Umber"]
TEAMS = ["Lions", "Hawks", "Bears", "Wolves", "Sharks", "Eagles", "Tigers", "Falcons"]
MOVIES = ["Moonfall", "Redline", "Icebound", "Skyward", "Deepwater", "Nightjar", "Sundown", "Harbor"]


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # string | integer | number | boolean
    values: tuple  # drawn from
    required: bool = True
    enum: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: tuple[Param, ...]
    ask: str  # the user's request, with {param} slots
    respond: object  # (args, rng) -> response dict
    answer: str  # the final answer, with {param} and {response key} slots

    def schema(self) -> dict:
        properties = {}
        for p in self.params:
            properties[p.name] = {"type": p.type} | ({"enum": list(p.values)} if p.enum else {})
        required = [p.name for p in self.params if p.required]
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                "parameters": {"type": "object", "properties": properties, "required": required}}}  # fmt: skip

    def signature(self) -> str:
        args = []
        for p in self.params:
            kind = "|".join(json.dumps(v) for v in p.values) if p.enum else p.type
            args.append(f"{p.name}{'' if p.required else '?'}: {kind}")
        return f"{self.name}({', '.join(args)}): {self.description}"


def _p(name, type_, values, required=True, enum=False) -> Param:
    return Param(name, type_, tuple(values), required, enum)


def _num(rng, lo, hi):
    return rng.randint(lo, hi)


# Each domain: its tools; `chain` names a (first, second, key) pair where the second tool's argument `key` is taken
# from the first's response. `unserved` are requests no tool of the domain serves.
# fmt: off
DOMAINS: dict[str, dict] = {
    "weather": {
        "tools": [
            Tool("get_weather", "Current weather in a city",
                 (_p("city", "string", CITIES), _p("unit", "string", ["celsius", "fahrenheit"], False, True)),
                 "What is the weather in {city} in {unit}?",
                 lambda a, r: {"temperature": _num(r, -5, 35), "sky": r.choice(["sunny", "cloudy", "rainy"])},
                 "It is {temperature} degrees and {sky} in {city}."),
            Tool("get_forecast", "Weather forecast for the next days",
                 (_p("city", "string", CITIES), _p("days", "integer", range(1, 8))),
                 "Give me the {days} day forecast for {city}.",
                 lambda a, r: {"summary": r.choice(["mild", "stormy", "dry", "windy"])},
                 "The next {days} days in {city} look {summary}."),
            Tool("get_air_quality", "Air quality index of a city", (_p("city", "string", CITIES),),
                 "How is the air quality in {city}?", lambda a, r: {"aqi": _num(r, 10, 180)},
                 "The air quality index in {city} is {aqi}."),
        ],
        "unserved": ["Book me a table for two tonight.", "Translate hello into German."],
    },
    "travel": {
        "tools": [
            Tool("search_flights", "Find flights between two cities on a date",
                 (_p("origin", "string", CITIES), _p("destination", "string", CITIES), _p("date", "string", DATES)),
                 "Find a flight from {origin} to {destination} on {date}.",
                 lambda a, r: {"flight_id": f"F{_num(r, 100, 999)}", "price": _num(r, 80, 900)},
                 "Flight {flight_id} from {origin} to {destination} costs {price} dollars."),
            Tool("book_flight", "Book a flight by its id for a passenger",
                 (_p("flight_id", "string", [f"F{i}" for i in range(100, 1000, 37)]), _p("passenger", "string", NAMES)),
                 "Book flight {flight_id} for {passenger}.",
                 lambda a, r: {"confirmation": f"C{_num(r, 1000, 9999)}"},
                 "Booked, confirmation {confirmation}."),
            Tool("search_hotels", "Find hotels in a city",
                 (_p("city", "string", CITIES), _p("guests", "integer", range(1, 5)),
                  _p("breakfast", "boolean", [True, False], False)),
                 "Find a hotel in {city} for {guests} guests.",
                 lambda a, r: {"hotel": r.choice(["Grand", "Plaza", "Central", "Harbor"]), "rate": _num(r, 50, 400)},
                 "Hotel {hotel} in {city} costs {rate} per night."),
        ],
        "chain": ("search_flights", "book_flight", "flight_id"),
        "unserved": ["What is the capital of Peru?", "Play some jazz music."],
    },
    "finance": {
        "tools": [
            Tool("get_stock_price", "Latest price of a stock ticker", (_p("ticker", "string", TICKERS),),
                 "What is the stock price of {ticker}?", lambda a, r: {"price": round(r.uniform(5, 500), 2)},
                 "{ticker} trades at {price}."),
            Tool("convert_currency", "Convert an amount between currencies",
                 (_p("amount", "number", [10, 25, 50, 100, 250, 1000]), _p("source", "string", CURRENCIES),
                  _p("target", "string", CURRENCIES)),
                 "Convert {amount} {source} to {target}.", lambda a, r: {"result": round(r.uniform(1, 2000), 2)},
                 "{amount} {source} is {result} {target}."),
            Tool("get_exchange_rate", "Exchange rate between two currencies",
                 (_p("source", "string", CURRENCIES), _p("target", "string", CURRENCIES)),
                 "What is the exchange rate from {source} to {target}?",
                 lambda a, r: {"rate": round(r.uniform(0.01, 150), 4)}, "One {source} buys {rate} {target}."),
        ],
        "unserved": ["Send an email to my boss.", "Find a recipe for soup."],
    },
    "calendar": {
        "tools": [
            Tool("create_event", "Create a calendar event",
                 (_p("title", "string", ["standup", "review", "lunch", "planning", "demo"]),
                  _p("date", "string", DATES), _p("attendees", "integer", range(1, 9), False)),
                 "Create a {title} event on {date}.", lambda a, r: {"event_id": f"E{_num(r, 10, 99)}"},
                 "Created the {title} event on {date} as {event_id}."),
            Tool("list_events", "List the events on a date", (_p("date", "string", DATES),),
                 "What is on my calendar on {date}?", lambda a, r: {"count": _num(r, 0, 6)},
                 "You have {count} events on {date}."),
            Tool("send_message", "Send a message to a contact",
                 (_p("contact", "string", NAMES), _p("text", "string", ["running late", "see you soon", "call me"])),
                 "Send {contact} the message {text}.", lambda a, r: {"status": "delivered"},
                 "Your message to {contact} was {status}."),
        ],
        "unserved": ["What is the weather in Oslo?", "Convert 10 USD to EUR."],
    },
    # held out: tools never seen in training
    "recipes": {
        "tools": [
            Tool("search_recipes", "Find recipes for a dish",
                 (_p("dish", "string", DISHES), _p("servings", "integer", range(1, 7), False)),
                 "Find a recipe for {dish}.",
                 lambda a, r: {"recipe_id": f"R{_num(r, 10, 99)}", "minutes": _num(r, 10, 90)},
                 "Recipe {recipe_id} makes {dish} in {minutes} minutes."),
            Tool("get_nutrition", "Calories of a dish", (_p("dish", "string", DISHES),),
                 "How many calories are in {dish}?", lambda a, r: {"calories": _num(r, 150, 900)},
                 "{dish} has {calories} calories."),
        ],
        "unserved": ["Book a flight to Rome.", "What is the stock price of ACME?"],
    },
    "music": {
        "tools": [
            Tool("search_songs", "Find songs by an artist",
                 (_p("artist", "string", ARTISTS), _p("limit", "integer", range(1, 6), False)),
                 "Find songs by {artist}.", lambda a, r: {"song": r.choice(["Echoes", "Drift", "Glow"]),
                                                         "song_id": f"S{_num(r, 10, 99)}"},
                 "{artist} sings {song}."),
            Tool("play_song", "Play a song by its id", (_p("song_id", "string", [f"S{i}" for i in range(10, 99, 7)]),),
                 "Play song {song_id}.", lambda a, r: {"status": "playing"}, "Song {song_id} is {status}."),
        ],
        "chain": ("search_songs", "play_song", "song_id"),
        "unserved": ["What is on my calendar today?", "Find a hotel in Lima."],
    },
    "sports": {
        "tools": [
            Tool("get_score", "Latest score of a team", (_p("team", "string", TEAMS),),
                 "What was the score of the {team}?", lambda a, r: {"score": f"{_num(r, 0, 5)}-{_num(r, 0, 5)}"},
                 "The {team} played {score}."),
            Tool("get_standings", "League position of a team",
                 (_p("team", "string", TEAMS), _p("season", "integer", [2022, 2023, 2024], False)),
                 "Where are the {team} in the standings?", lambda a, r: {"position": _num(r, 1, 20)},
                 "The {team} are in position {position}."),
        ],
        "unserved": ["Convert 50 EUR to JPY.", "Send Bob a message."],
    },
    "movies": {
        "tools": [
            Tool("find_showtimes", "Showtimes of a movie in a city",
                 (_p("movie", "string", MOVIES), _p("city", "string", CITIES)),
                 "When is {movie} showing in {city}?", lambda a, r: {"time": f"{_num(r, 12, 23)}:00"},
                 "{movie} shows at {time} in {city}."),
            Tool("get_movie_rating", "Rating of a movie", (_p("movie", "string", MOVIES),),
                 "How good is {movie}?", lambda a, r: {"rating": round(r.uniform(1, 10), 1)},
                 "{movie} is rated {rating}."),
        ],
        "unserved": ["Find songs by Nova.", "What is the air quality in Rome?"],
    },
}
# fmt: on
IN_DOMAIN = ("weather", "travel", "finance", "calendar")
HELD_OUT = ("recipes", "music", "sports", "movies")
KINDS = (("single", 0.4), ("chain", 0.2), ("pair", 0.15), ("error", 0.1), ("unserved", 0.15))


def _action(name: str, arguments: dict) -> str:
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


def _finish(answer: str | None) -> str:
    if answer is None:
        return _action("Finish", {"return_type": "give_up_and_restart"})
    return _action("Finish", {"return_type": "give_answer", "final_answer": answer})


def _arguments(tool: Tool, rng: random.Random, given: dict | None = None) -> dict:
    arguments = {}
    for p in tool.params:
        if given and p.name in given:
            arguments[p.name] = given[p.name]
        elif p.required or rng.random() < 0.5:
            taken = [v for v in arguments.values() if isinstance(v, str)]  # origin != destination, source != target
            arguments[p.name] = rng.choice([v for v in p.values if v not in taken] or p.values)
    return arguments


def _ask(tool: Tool, arguments: dict) -> str:
    text = tool.ask.format(**{p.name: arguments.get(p.name, "") for p in tool.params})
    extras = [f"{p.name} {json.dumps(arguments[p.name])}" for p in tool.params
              if p.name in arguments and "{" + p.name + "}" not in tool.ask]  # fmt: skip
    return text + (f" Use {', '.join(extras)}." if extras else "")


def _answer(tool: Tool, arguments: dict, response: dict) -> str:
    return tool.answer.format(**{p.name: arguments.get(p.name, "") for p in tool.params}, **response)


def conversation(domain: str, kind: str, rng: random.Random) -> dict:
    """One conversation of `kind` with the tools of `domain`: {"messages": [...], "tools": [...]}."""
    spec = DOMAINS[domain]
    tools: list[Tool] = spec["tools"]
    system = SYSTEM + "".join(f"\n{t.signature()}" for t in tools)
    messages = [{"role": "system", "content": system}]
    if kind == "chain" and "chain" not in spec:
        kind = "pair"
    if kind == "unserved":
        messages += [{"role": "user", "content": rng.choice(spec["unserved"])},
                     {"role": "assistant", "content": _finish(None)}]  # fmt: skip
    elif kind in ("single", "error"):
        tool = rng.choice(tools)
        arguments = _arguments(tool, rng)
        messages += [{"role": "user", "content": _ask(tool, arguments)},
                     {"role": "assistant", "content": _action(tool.name, arguments)}]  # fmt: skip
        if kind == "error":
            error = rng.choice(["service unavailable", "not found", "rate limit exceeded"])
            messages += [{"role": "tool", "content": json.dumps({"error": error})},
                         {"role": "assistant", "content": _finish(None)}]  # fmt: skip
        else:
            response = tool.respond(arguments, rng)
            messages += [{"role": "tool", "content": json.dumps(response)},
                         {"role": "assistant", "content": _finish(_answer(tool, arguments, response))}]  # fmt: skip
    else:
        if kind == "chain":
            first_name, second_name, key = spec["chain"]
            first, second = (next(t for t in tools if t.name == n) for n in (first_name, second_name))
        else:
            first, second = rng.sample(tools, 2)
            key = None
        first_args = _arguments(first, rng)
        first_response = first.respond(first_args, rng)
        second_args = _arguments(second, rng, {key: first_response[key]} if key else None)
        second_response = second.respond(second_args, rng)
        request = _ask(first, first_args)
        if key:
            request += f" Then {second.description.lower()}" + "".join(
                f", {p.name} {json.dumps(second_args[p.name])}" for p in second.params
                if p.name in second_args and p.name != key) + "."  # fmt: skip
        else:
            request += " Also: " + _ask(second, second_args)
        answer = _answer(first, first_args, first_response) + " " + _answer(second, second_args, second_response)
        messages += [
            {"role": "user", "content": request},
            {"role": "assistant", "content": _action(first.name, first_args)},
            {"role": "tool", "content": json.dumps(first_response)},
            {"role": "assistant", "content": _action(second.name, second_args)},
            {"role": "tool", "content": json.dumps(second_response)},
            {"role": "assistant", "content": _finish(answer)},
        ]
    return {"messages": messages, "tools": [t.schema() for t in tools]}


def conversations(domains: tuple[str, ...], count: int, rng: random.Random) -> list[dict]:
    kinds, weights = zip(*KINDS, strict=True)
    return [conversation(rng.choice(domains), rng.choices(kinds, weights)[0], rng) for _ in range(count)]


def steps(conversation_row: dict) -> list[dict]:
    """One evaluation row per assistant turn: the conversation before it, the turn as the reference, the tools."""
    messages = conversation_row["messages"]
    return [{"messages": messages[: i + 1], "tools": conversation_row["tools"]}
            for i, m in enumerate(messages) if m["role"] == "assistant"]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def generate(out: Path, train: int, test: int, seed: int) -> dict[str, Path]:
    """train.jsonl (conversations, in-domain tools), test_in_domain.jsonl and test_out_of_domain.jsonl (steps),
    tokenizer_corpus.txt (the training conversations' text, for a tokenizer that never saw held-out tools)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = conversations(IN_DOMAIN, train, rng)
    names = {"train": "train.jsonl", "test_in_domain": "test_in_domain.jsonl",
             "test_out_of_domain": "test_out_of_domain.jsonl", "corpus": "tokenizer_corpus.txt"}  # fmt: skip
    files = {key: out / name for key, name in names.items()}
    write_jsonl(files["train"], train_rows)
    write_jsonl(files["test_in_domain"], [s for c in conversations(IN_DOMAIN, test, rng) for s in steps(c)])
    write_jsonl(files["test_out_of_domain"], [s for c in conversations(HELD_OUT, test, rng) for s in steps(c)])
    files["corpus"].write_text("\n".join(m["content"] for row in train_rows for m in row["messages"]) + "\n")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=1200, help="training conversations")
    parser.add_argument("--test", type=int, default=150, help="test conversations per split (rows are their steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in generate(args.out, args.train, args.test, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
