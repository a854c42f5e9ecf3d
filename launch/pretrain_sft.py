"""Pretraining / SFT / LoRA entry point: parse the job, run it (megatron_swift/training/job.py).

torchrun --nproc_per_node N launch/pretrain_sft.py --config FILE.yaml [--section.field value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_swift.config import ConfigError, load_config
from megatron_swift.quiet import silence_known_noise
from megatron_swift.training.config import JobConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML job file; --section.field value pairs override it")
    known, overrides = parser.parse_known_args(argv)
    silence_known_noise()
    from megatron_swift.checkpoint.hf import CheckpointError
    from megatron_swift.data import DataError
    from megatron_swift.models import UnsupportedModelError
    from megatron_swift.training.job import train
    from megatron_swift.training.preemption import mark_clean_exit, register_rank
    from megatron_swift.tuners.lora.layers import LoraError

    register_rank()
    try:
        results = train(load_config(JobConfig, known.config, overrides))
    except (ConfigError, DataError, CheckpointError, UnsupportedModelError, LoraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (full, read-only, quota): name the path, not a traceback
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    mark_clean_exit(f"{len(results)} steps in this run")
    return 0


if __name__ == "__main__":  # also required: megatron-core's checkpoint writer starts processes
    sys.exit(main())
