"""Collect what tests/gpu/run_all.sh ran into one summary.json and one summary.md (printed too).

    python tests/gpu/summary.py PARTS DEST --budget S --elapsed S [--smoke]

PARTS holds run_all.sh's status.tsv (name, script, status, exit code, seconds, cap per check), each
check's log NAME.log and its --out folder NAME/ with the check's JSON. Every figure of every check's
JSON goes into both files: nested objects are flattened to dotted keys, lists of rows become tables.
Exits 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from pathlib import Path

# What decides the results, and the extras the device machine does not have (tests/gpu/README.md).
PACKAGES = ["torch", "triton", "transformers", "peft", "megatron-core", "torchao", "datasets", "numpy",
            "safetensors", "tokenizers", "transformer-engine", "vllm"]  # fmt: skip
LOG_TAIL_LINES = 15
# Keys every check repeats (tests/gpu/common.py); the Markdown gives the packages once, at the top.
SHARED_KEYS = ("torch", "transformer_engine", "vllm")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_checks(parts: Path) -> list[dict]:
    checks = []
    for line in (parts / "status.tsv").read_text().splitlines():
        name, script, status, rc, seconds, cap = line.split("\t")
        results = sorted((parts / name).glob("*.json"))
        check = {"name": name, "script": f"tests/gpu/{script}", "status": status,
                 "exit_code": int(rc) if rc else None, "seconds": int(seconds), "cap_seconds": int(cap),
                 "result": json.loads(results[0].read_text()) if results else None}  # fmt: skip
        log = parts / f"{name}.log"
        if status != "passed" and log.exists():
            check["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        checks.append(check)
    return checks


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def flatten(value, prefix: str = "") -> dict:
    """Dotted keys to leaves; a list of objects is kept whole (it becomes a table)."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def render(result: dict) -> list[str]:
    lines, tables = [], []
    for key, value in flatten({k: v for k, v in result.items() if k not in SHARED_KEYS}).items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            tables.append((key, value))
        else:
            lines.append(f"- {key}: {cell(value)}")
    for key, rows in tables:
        columns = list(dict.fromkeys(column for row in rows for column in flatten(row)))
        lines += ["", f"{key}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in map(flatten, rows):
            lines.append("| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |")
    return lines


def markdown(summary: dict) -> str:
    head = "GPU checks" + (" (--smoke on CPU: the scripts ran, nothing was measured)" if summary["smoke"] else "")
    packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in summary["packages"].items())
    lines = [f"# {head}", "",
             f"{summary['elapsed_seconds']} s of a {summary['budget_seconds']} s budget; Python {summary['python']}; "
             f"{packages}", "", "| check | status | seconds | cap |", "|---|---|---:|---:|"]  # fmt: skip
    lines += [f"| {c['name']} | {c['status']} | {c['seconds']} | {c['cap_seconds']} |" for c in summary["checks"]]
    for check in summary["checks"]:
        lines += ["", f"## {check['name']}: {check['status']} ({check['script']})", ""]
        if check["result"] is not None:
            lines += render(check["result"])
        if "log_tail" in check:
            lines += ["", "```", *check["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("parts", type=Path)
    cli.add_argument("dest", type=Path)
    cli.add_argument("--budget", type=int, required=True)
    cli.add_argument("--elapsed", type=int, required=True)
    cli.add_argument("--smoke", action="store_true")
    args = cli.parse_args()
    checks = read_checks(args.parts)
    summary = {"smoke": args.smoke, "budget_seconds": args.budget, "elapsed_seconds": args.elapsed,
               "python": platform.python_version(), "packages": versions(),
               "all_passed": all(c["status"] == "passed" for c in checks), "checks": checks}  # fmt: skip
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.dest / "summary.md").write_text(text)
    print(text)
    raise SystemExit(0 if summary["all_passed"] else 1)


if __name__ == "__main__":
    main()
