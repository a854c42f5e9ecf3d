"""One technique's run: the real training job in a subprocess (torchrun + the launcher), then its row.

Every run is the user's job file plus the comparison's shared overrides plus the technique's, in its own
output directory, so all techniques train the same steps on the same data with the same seed. The row is
read back from what the job wrote: `logs/metrics.jsonl` (losses, per-step time) and `logs/run_summary.json`
(each rank's peak memory, parameter counts), both measured by megatron_swift/training/measure.py, the code the
step benchmarks use. With an eval set the run also saves a checkpoint at its last step, which is exported
to HF (`python -m converters mcore-to-hf`, adapters merged) and scored with `python -m megatron_swift.eval`.
A run that fails gives a row with its status and the tail of its stderr; the comparison goes on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_swift.bench.techniques import Technique
from megatron_swift.training.measure import median_step_seconds, tokens_per_second

STDERR_TAIL_LINES = 20


def default_launcher() -> Path:
    """launch/pretrain_sft.py of the source tree megatron_swift is imported from."""
    return Path(__file__).resolve().parents[2] / "launch" / "pretrain_sft.py"


@dataclass
class RunSettings:
    out_dir: Path
    launcher: Path
    warmup: int
    eval_agent: str | None = None
    eval_qa: str | None = None
    max_new_tokens: int = 64
    eval_batch_size: int = 32
    timeout_s: float | None = None

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_agent or self.eval_qa)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])


def failure_reason(stderr: str) -> str:
    """Why a run failed, from its stderr: the launcher's `error:` message (with its indented lines), else the
    last exception line of a rank's traceback (not torchrun's own ChildFailedError), else the last line."""
    lines = stderr.rstrip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            block = [line]
            for following in lines[i + 1 :]:
                if not following.startswith("  "):
                    break
                block.append(following.strip())
            return "\n".join(block)
    exceptions = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)
                  and "ChildFailedError" not in ln]  # fmt: skip
    if exceptions:
        return exceptions[-1]
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "failed with no output on stderr")


def _run(command: list[str], log_prefix: Path, timeout_s: float | None) -> tuple[int, str]:
    """Run `command` with stdout / stderr in LOG.stdout / LOG.stderr; (exit code, why it failed + stderr tail)."""
    stdout, stderr = log_prefix.with_suffix(".stdout"), log_prefix.with_suffix(".stderr")
    with open(stdout, "w") as out, open(stderr, "w") as err:
        try:
            code = subprocess.run(command, stdout=out, stderr=err, timeout=timeout_s, env=os.environ.copy()).returncode
        except subprocess.TimeoutExpired:
            err.write(f"\nerror: timed out after {timeout_s:g} s\n")
            code = 124
    if code == 0:
        return code, ""
    return code, f"{failure_reason(stderr.read_text(errors='replace'))}\n--- stderr tail ---\n{_tail(stderr)}"


def train_command(technique: Technique, nproc: int, config: str, common: list[str], run_dir: Path,
                  settings: RunSettings) -> list[str]:  # fmt: skip
    outputs = ["--checkpoint.output_dir", str(run_dir), "--checkpoint.save", "null"]
    if settings.evaluates:  # one checkpoint, at the last step, to export and score
        outputs = ["--checkpoint.output_dir", str(run_dir), "--checkpoint.save", str(run_dir / "checkpoints"),
                   "--checkpoint.save_interval", "1000000000", "--checkpoint.save_total_limit", "1"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), str(settings.launcher), "--config", config,
            *common, *technique.overrides, *outputs]  # fmt: skip


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_from_logs(run_dir: Path, warmup: int) -> dict:
    """The figures of a finished run, from its metrics.jsonl and run_summary.json only."""
    records = read_metrics(run_dir / "logs" / "metrics.jsonl")
    summary = json.loads((run_dir / "logs" / "run_summary.json").read_text())
    step_seconds = median_step_seconds([r["step_seconds"] for r in records], warmup)
    validation = [r for r in records if r.get("val_loss") is not None]
    peaks = summary["peak_memory_bytes_per_rank"]
    return {
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "ranks": summary["world_size"],
        "peak_memory_gib_per_rank": [round(b / 2**30, 4) for b in peaks],
        "peak_memory_gib_max": round(max(peaks) / 2**30, 4),
        "peak_memory_kind": summary["peak_memory_kind"],
        "step_seconds_median": round(step_seconds, 5),
        "tokens_per_sec": round(tokens_per_second(summary["tokens_per_step"], step_seconds), 1),
        "tokens_per_step": summary["tokens_per_step"],
        "steps": len(records),
        "warmup_steps_excluded": min(warmup, max(len(records) - 1, 0)),
        "final_train_loss": records[-1]["loss"],
        "final_val_loss": validation[-1]["val_loss"] if validation else None,
        "loss_curve": {"step": [r["step"] for r in records], "loss": [r["loss"] for r in records]},
        "val_curve": {"step": [r["step"] for r in validation], "val_loss": [r["val_loss"] for r in validation]},
    }


def evaluate_run(technique: Technique, run_dir: Path, train_type_lora: bool, settings: RunSettings) -> tuple[dict, str]:
    """Export the run's last checkpoint to HF and score it; (task metrics, error or '')."""
    hf_dir = run_dir / "hf"
    export = [sys.executable, "-m", "converters", "mcore-to-hf", "--mcore", str(run_dir / "checkpoints"), "--out",
              str(hf_dir), *(["--merge-lora"] if train_type_lora else [])]  # fmt: skip
    code, tail = _run(export, run_dir / "export", settings.timeout_s)
    if code != 0:
        return {}, f"export failed (exit {code}):\n{tail}"
    evaluation = [sys.executable, "-m", "megatron_swift.eval", "--model", f"{technique.name}={hf_dir}",
                  "--max-new-tokens", str(settings.max_new_tokens), "--batch-size", str(settings.eval_batch_size),
                  "--out", str(run_dir / "eval")]  # fmt: skip
    evaluation += ["--agent", settings.eval_agent] if settings.eval_agent else []
    evaluation += ["--qa", settings.eval_qa] if settings.eval_qa else []
    code, tail = _run(evaluation, run_dir / "eval", settings.timeout_s)
    if code != 0:
        return {}, f"evaluation failed (exit {code}):\n{tail}"
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    scores = report["results"][technique.name]
    return {kind: scores[kind] for kind in ("agent", "qa") if kind in scores}, ""


def run_technique(technique: Technique, nproc: int, config: str, common: list[str], train_type_lora: bool,
                  settings: RunSettings) -> dict:  # fmt: skip
    """Train (and optionally evaluate) one technique; its row, never raising for a failed run."""
    run_dir = settings.out_dir / "runs" / technique.name
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"technique": technique.name, "description": technique.description, "overrides": list(technique.overrides),
           "ranks": nproc, "run_dir": str(run_dir)}  # fmt: skip
    started = time.perf_counter()
    code, tail = _run(train_command(technique, nproc, config, common, run_dir, settings), run_dir / "train",
                      settings.timeout_s)  # fmt: skip
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    if code != 0:
        return {**row, "status": "failed", "error": f"training exited with {code}:\n{tail}"}
    try:
        row |= row_from_logs(run_dir, settings.warmup)
    except (OSError, KeyError, ValueError) as exc:
        return {**row, "status": "failed", "error": f"the run left no readable metrics ({exc}):\n{tail}"}
    if settings.evaluates:
        metrics, error = evaluate_run(technique, run_dir, train_type_lora, settings)
        if error:  # the training figures stand; the row says the evaluation failed
            return {**row, "status": "eval failed", "error": error}
        row["task_metrics"] = metrics
    return {**row, "status": "ok"}
