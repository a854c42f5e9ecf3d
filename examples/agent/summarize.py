"""The agent example's table: base vs tuned agent metrics per split, mean and spread over the seeds that ran.

python examples/agent/summarize.py OUT_DIR      (reads OUT_DIR/seed*/eval_{in_domain,out_of_domain}/report.json,
                                                the numbers mswift-eval wrote; prints Markdown, writes summary.json)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = [("plan_em", "Plan.EM"), ("act_em", "Act.EM"), ("argument_f1", "Argument F1"),
           ("hallucination_rate", "Hallucination rate"), ("rouge_l", "Rouge-L")]  # fmt: skip
SPLITS = [("in_domain", "in-domain"), ("out_of_domain", "out-of-domain (held-out tools)")]


def collect(out: Path) -> dict:
    """{split: {model: {metric: [value per seed]}}, "seeds": [...]} from the eval reports."""
    seeds = sorted((p for p in out.glob("seed*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    table: dict = {"seeds": [int(p.name[4:]) for p in seeds]}
    for split, _ in SPLITS:
        for seed_dir in seeds:
            report = json.loads((seed_dir / f"eval_{split}" / "report.json").read_text())
            for model, result in report["results"].items():
                for key, _ in METRICS:
                    table.setdefault(split, {}).setdefault(model, {}).setdefault(key, []).append(result["agent"][key])
    return table


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(table: dict) -> str:
    seeds = table["seeds"]
    spread = "mean ± standard deviation over" if len(seeds) > 1 else "one run,"
    lines = [f"Agent metrics, base vs tuned ({spread} seeds {', '.join(map(str, seeds))}; per-seed values in "
             "summary.json)", ""]  # fmt: skip
    for split, title in SPLITS:
        lines += [f"**{title}**", "", "| metric | base | tuned |", "|---|---:|---:|"]
        for key, name in METRICS:
            lines.append(f"| {name} | {_cell(table[split]['base'][key])} | {_cell(table[split]['tuned'][key])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1])
    table = collect(out)
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))


if __name__ == "__main__":
    main()
