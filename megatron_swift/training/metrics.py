"""Per-step metrics on rank 0: JSON lines, TensorBoard, optional Weights & Biases, GPU telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_swift.fs import atomic_write_text
from megatron_swift.training.measure import peak_memory_bytes


class GpuTelemetry:
    """Utilisation and memory of this process's GPU through nvidia-ml-py (NVML); inactive without a GPU."""

    def __init__(self):
        self.handle = None
        if torch.cuda.is_available():
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def read(self) -> dict:
        if self.handle is None:
            return {}
        import pynvml

        return {
            "gpu_util": pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
            "gpu_mem_used_gb": round(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1024**3, 3),
        }


def _keep_steps_up_to(jsonl: Path, last_step: int) -> None:
    """Drop the records after `last_step` (a resumed run logs those steps again); atomic."""
    if not jsonl.is_file():
        return
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(jsonl, "".join(kept))


class MetricsLogger:
    """Writes OUTPUT_DIR/logs/metrics.jsonl and TensorBoard events; wandb when a project is set.

    A run that starts at `start_step` (a resumed one) first drops what an earlier run logged after that step,
    from the JSON lines and (TensorBoard's purge_step) from the events, so the history holds each step once:
    the latest run's."""

    def __init__(self, log_dir: Path, config: dict, tensorboard: bool = True, wandb_project: str | None = None,
                 start_step: int = 0):  # fmt: skip
        log_dir.mkdir(parents=True, exist_ok=True)
        _keep_steps_up_to(log_dir / "metrics.jsonl", start_step)
        self.jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir / "tensorboard", purge_step=start_step + 1)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    "logging.wandb_project is set but wandb is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(log_dir))
        self.gpu = GpuTelemetry()

    def log(self, record: dict) -> dict:
        record = {**record, "mem_gb": round(peak_memory_bytes() / 1024**3, 3), **self.gpu.read()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and type(v) in (int, float)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        return record

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
