"""The QA and agent datasets of one run: rows read and checked before any model work, and what was left out.

A malformed row (bad JSON, missing fields, an agent row without tools) stops the run with its
file:line, or with `skip_bad_rows` (`--skip-bad-rows`) is skipped and counted, as the training
pipeline's `data.skip_bad_rows` does. An agent row whose reference turn cannot be read (say an
`Action: Finish` with an unknown return type) is always counted and left out: one such row never stops
a dataset. A reference call whose arguments are not a JSON object keeps its step (Plan.EM, Act.EM)
but leaves it out of argument F1; those are counted too. Each count comes with the first few file:line
reasons, for the report's `data` section and its summary lines (`data_entry`, also used for the
perplexity data, whose bad rows the training pipeline finds while encoding it for each model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_swift.data.errors import BadRows
from megatron_swift.eval.agent_metrics import Turn, parse_turn, tool_names
from megatron_swift.eval.generation import PromptRow, read_prompt_rows
from megatron_swift.eval.loading import EvalInputError


def _counter() -> BadRows:
    return BadRows(skip=True)  # counts and keeps examples, never raises


@dataclass
class EvalDataset:
    path: str
    rows: list[PromptRow]  # the rows that are scored
    bad_rows: BadRows
    references: list[Turn] = field(default_factory=list)  # agent only: parsed reference turns, one per row
    tools: list[set[str]] = field(default_factory=list)  # agent only: each row's tool names
    unreadable_references: BadRows = field(default_factory=_counter)
    unreadable_reference_arguments: BadRows = field(default_factory=_counter)

    def report(self) -> dict:
        return data_entry(
            self.path, len(self.rows), self.bad_rows, self.unreadable_references, self.unreadable_reference_arguments
        )


def data_entry(path: str, scored_rows: int, bad_rows: BadRows, unreadable_references: BadRows | None = None,
               unreadable_reference_arguments: BadRows | None = None) -> dict:  # fmt: skip
    """The report's `data` entry for one dataset: rows (scored + left out), rows scored, and each count with
    its first file:line reasons."""
    counters = {"bad_rows": bad_rows, "unreadable_references": unreadable_references or _counter(),
                "unreadable_reference_arguments": unreadable_reference_arguments or _counter()}  # fmt: skip
    left_out = bad_rows.count + counters["unreadable_references"].count
    entry = {"path": path, "rows": scored_rows + left_out, "scored_rows": scored_rows}
    for name, counter in counters.items():
        entry |= {name: counter.count, f"{name}_examples": counter.examples}
    return entry


def read_qa(path: str, skip_bad_rows: bool) -> EvalDataset:
    bad = BadRows(skip=skip_bad_rows, option="--skip-bad-rows")
    return _checked(EvalDataset(path, read_prompt_rows(path, bad), bad))


def read_agent(path: str, skip_bad_rows: bool) -> EvalDataset:
    bad = BadRows(skip=skip_bad_rows, option="--skip-bad-rows")
    dataset = EvalDataset(path, [], bad)
    for row in read_prompt_rows(path, bad):
        if not row.tools:
            bad.report(row.where, "agent rows need a non-empty 'tools' list")
            continue
        reference = parse_turn(row.reference)
        if reference.plan == "invalid":
            dataset.unreadable_references.report(
                row.where,
                "the reference assistant turn is not a readable tool call, final answer or give-up (an `Action: "
                "Finish` input needs return_type give_answer, give_up_and_restart or give_up)",
            )
            continue
        if not reference.arguments_readable:
            dataset.unreadable_reference_arguments.report(
                row.where, "the reference tool arguments are not a JSON object: step left out of argument F1"
            )
        dataset.rows.append(row)
        dataset.references.append(reference)
        dataset.tools.append(tool_names(row.tools))
    return _checked(dataset)


def _checked(dataset: EvalDataset) -> EvalDataset:
    if not dataset.rows:
        raise EvalInputError(
            f"{dataset.path}: no row can be scored ({dataset.bad_rows.count} bad, "
            f"{dataset.unreadable_references.count} with an unreadable reference)"
        )
    return dataset
