"""Evaluation reports: one JSON with every figure and a markdown table with the models side by side.

Results are `{model name: {section: {metric: value}}}`; the table has one row per metric and one
column per model, plus a difference column (last minus first) when exactly two models are compared.
Under the table, one line per dataset that left rows or steps out (the report's `data` section).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_swift.fs import atomic_write_text

# Display order; metrics not listed here follow in the order they appear.
ORDER = {
    "size": ["disk_mb"],
    "perplexity": ["loss", "perplexity", "target_tokens"],
    "qa": ["exact_match", "normalized_match", "rows"],
    "agent": ["plan_em", "act_em", "argument_f1", "hallucination_rate", "rouge_l", "invalid_rate", "steps"],
}


def _metric_rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for per_model in results.values():
        for section, metrics in per_model.items():
            if not isinstance(metrics, dict):
                continue
            preferred = [m for m in ORDER.get(section, []) if m in metrics]
            for metric in preferred + [m for m in metrics if m not in preferred]:
                value = metrics[metric]
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if (numeric or value is None) and (section, metric) not in rows:
                    rows.append((section, metric))
    return rows


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def markdown_table(results: dict[str, dict]) -> str:
    names = list(results)
    compare = len(names) == 2
    header = ["metric", *names] + ([f"{names[1]} - {names[0]}"] if compare else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for section, metric in _metric_rows(results):
        values = [results[name].get(section, {}).get(metric) for name in names]
        cells = [f"{section}.{metric}", *map(_cell, values)]
        if compare:
            both = all(isinstance(v, (int, float)) for v in values)
            cells.append(_cell(values[1] - values[0]) if both else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# A `data` count -> what the summary line calls it.
LEFT_OUT = {
    "bad_rows": "bad rows skipped (--skip-bad-rows)",
    "unreadable_references": "rows with an unreadable reference, left out",
    "unreadable_reference_arguments": "steps whose reference tool arguments are not JSON, left out of argument F1",
}


def data_lines(data: dict[str, dict]) -> list[str]:
    """One line per dataset that left something out: the counts and the first file:line reasons."""
    lines = []
    for kind, entry in data.items():
        parts = [
            f"{what}: {entry[count]} (first: {'; '.join(entry[f'{count}_examples'])})"
            for count, what in LEFT_OUT.items()
            if entry[count]
        ]
        if parts:
            lines.append(f"{kind} data {entry['path']}: {entry['scored_rows']} of {entry['rows']} rows scored; "
                         + "; ".join(parts))  # fmt: skip
    return lines


def write_report(out_dir: str | Path, report: dict, title: str = "Evaluation") -> str:
    """Write report.json (everything) and report.md (the table, then the data lines); returns the markdown."""
    out_dir = Path(out_dir)
    markdown = f"# {title}\n\n" + markdown_table(report["results"])
    notes = data_lines(report.get("data", {}))
    if notes:
        markdown += "\n" + "".join(f"- {line}\n" for line in notes)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown)
    return markdown
