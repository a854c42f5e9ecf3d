"""The comparison's outputs: OUT/techniques.json (every figure, the loss curves included), techniques.md (the
table) and techniques.png (matplotlib: the loss curves of all techniques on one chart, peak memory and
throughput bars). The plot draws the rows' curves exactly as read from each run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

AGENT_COLUMNS = [("plan_em", "Plan.EM"), ("act_em", "Act.EM"), ("argument_f1", "Arg F1"),
                 ("hallucination_rate", "Halluc."), ("rouge_l", "Rouge-L")]  # fmt: skip


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _first_line(error: str) -> str:
    """The row's reason: the first lines of the error (runner.failure_reason's, before the stderr tail)."""
    reason = error.split("--- stderr tail ---")[0].strip().splitlines() or ["failed"]
    return " ".join(line.strip() for line in reason[:3]).replace("|", "\\|")[:240]


def markdown(results: dict) -> str:
    rows = results["rows"]
    with_agent = any("agent" in row.get("task_metrics", {}) for row in rows)
    with_qa = any("qa" in row.get("task_metrics", {}) for row in rows)
    header = ["technique", "ranks", "trainable params", "peak mem / rank (GiB, max)", "tokens/s", "step (s)",
              "train loss", "val loss"]  # fmt: skip
    header += [title for _, title in AGENT_COLUMNS] if with_agent else []
    header += ["QA acc"] if with_qa else []
    header += ["status"]
    lines = [
        "# Techniques compared",
        "",
        f"Job `{results['config']}`, shared overrides `{' '.join(results['common_overrides']) or '(none)'}`; "
        f"{results['train_iters']} steps each, same data and seed; step time is the median after "
        f"{results['warmup']} warm-up steps, tokens/s = tokens per step / that median; peak memory "
        f"({results['memory_kind']}) is each rank's over the training steps.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|",
    ]
    for row in rows:
        if "loss_curve" not in row:  # the training run failed: nothing measured
            cells = [row["technique"], str(row["ranks"])] + ["-"] * (len(header) - 3)
            cells.append(f"failed: {_first_line(row['error'])}")
        else:
            cells = [row["technique"], str(row["ranks"]), f"{row['trainable_parameters']:,}",
                     f"{row['peak_memory_gib_max']:.3f}", f"{row['tokens_per_sec']:.0f}",
                     f"{row['step_seconds_median']:.4f}", _number(row["final_train_loss"]),
                     _number(row["final_val_loss"])]  # fmt: skip
            agent = row.get("task_metrics", {}).get("agent", {})
            cells += [_number(agent.get(key), 3) for key, _ in AGENT_COLUMNS] if with_agent else []
            cells += [_number(row.get("task_metrics", {}).get("qa", {}).get("exact_match"), 3)] if with_qa else []
            cells.append("ok" if row["status"] == "ok" else f"{row['status']}: {_first_line(row['error'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: dict):
    """Three panels: training loss per step for every finished technique, peak memory per rank (max over ranks),
    tokens/s; a matplotlib Figure (close it when done)."""
    from megatron_swift._optional import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [row for row in results["rows"] if "loss_curve" in row]  # every run that trained
    fig, (curves, memory, speed) = plt.subplots(1, 3, figsize=(16, 4.5))
    for row in done:
        curves.plot(row["loss_curve"]["step"], row["loss_curve"]["loss"], label=row["technique"])
    curves.set(title="training loss", xlabel="step", ylabel="loss")
    if done:
        curves.legend(fontsize="small")
    names = [row["technique"] for row in done]
    memory.bar(names, [row["peak_memory_gib_max"] for row in done], color="tab:orange")
    memory.set(title=f"peak memory per rank ({results['memory_kind']})", ylabel="GiB")
    speed.bar(names, [row["tokens_per_sec"] for row in done], color="tab:green")
    speed.set(title="throughput", ylabel="tokens/s")
    for axes in (memory, speed):
        axes.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict, out_dir: Path, plots: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "techniques.json", out_dir / "techniques.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(markdown(results))
    if plots:
        plot(results, out_dir / "techniques.png")
        written.append(out_dir / "techniques.png")
    return written
