"""Where every benchmark's results go: NAME.json (all figures) and NAME.md (a short table), printed too."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: Path, name: str, results: dict, report: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(report)
    print(report)
