"""Worker for the planner tests: what the real run holds per rank, for many layouts inside ONE launch.

For each case the job is built and wrapped exactly as training does (check_job, build_model,
wrap_for_training) and trained one step on synthetic batches, so that the optimizer's lazily created
states exist. Then, measured from the objects, never from the planner's arithmetic:

- weights: the storages behind the model's parameters (the padded param buffer with the distributed
  optimizer, whose parameters are views into it);
- grads: the storages behind each trainable parameter's `main_grad` (the fp32 DDP grad buffers);
- optimizer: every tensor in the inner optimizers' `state` plus the parameters they update that are not
  model parameters (fp32 main copies or shards), deduplicated by storage;
- dynamic peak: a second step under the torch profiler with memory events; the running sum of CPU
  allocations minus frees over the step, its maximum (the static part is allocated before the step).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from tests.train_matrix import job_for


def _storages(tensors) -> dict[int, int]:
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def static_bytes(chunks, optimizer) -> dict[str, int]:
    from megatron_swift.training.optim import inner_optimizers

    params = [p for chunk in chunks for p in chunk.parameters()]
    weights = _storages(params)
    grads = _storages(getattr(p, "main_grad", None) for p in params if p.requires_grad)
    grads.update(_storages(p.grad for p in params))
    held = set(weights) | set(grads)
    states = {}
    for inner in inner_optimizers(optimizer):
        torch_optimizer = inner.optimizer
        for state in torch_optimizer.state.values():
            states.update(_storages(state.values()))
        states.update(_storages(p for group in torch_optimizer.param_groups for p in group["params"]))
    optimizer_bytes = sum(n for ptr, n in states.items() if ptr not in held)
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": optimizer_bytes}


def _peak_of_trace(path: str) -> int:
    with open(path) as trace:
        events = [e for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e["args"].get("Device Type", 0) == 0]
    current = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        current += event["args"]["Bytes"]
        peak = max(peak, current)
    return peak


def _global_buffers() -> list:
    from megatron.core import parallel_state as ps

    buffer = getattr(ps, "_GLOBAL_MEMORY_BUFFER", None)
    return list(getattr(buffer, "buffer", {}).values()) if buffer is not None else []


def microbatches(vocab: int, count: int, micro_batch_size: int, seq: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro_batch_size, seq + 1), generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(micro_batch_size, seq),
            }
        )
    return batches


def measure_cases(cases: list[dict], data_path: str, output_dir: str) -> dict:
    """(case index, global rank) -> measured bytes; each case: hf, parallel, train, and optional lora, model,
    data (DataSection fields, seq_length among them), profile (measure the dynamic peak)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from torch.profiler import ProfilerActivity, profile

    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.training.optim import wrap_for_training
    from megatron_swift.training.step import train_step

    found = {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        for index, case in enumerate(cases):
            # The MoE routers' loss tracker is sized by the first MoE model a process builds (destroy_distributed
            # clears it too): another MoE model with other layers in the same launch needs it empty.
            get_moe_layer_wise_logging_tracker().clear()
            job = job_for(
                case["hf"],
                data_path,
                f"{output_dir}/case{index}",
                case["parallel"],
                case["train"],
                case.get("lora"),
                data=case.get("data"),
                **case.get("model", {}),
            )
            args = check_job(job, world)
            init_distributed(job.parallel, seed=job.train.seed)
            chunks, optimizer, scheduler = wrap_for_training(build_model(job, args), job)
            t = job.train
            dp = ps.get_data_parallel_world_size()
            count = t.global_batch_size // (t.micro_batch_size * dp)
            seed = 1000 * index + ps.get_data_parallel_rank()
            batches = microbatches(args.vocab_size, count, t.micro_batch_size, job.data.seq_length, seed)
            train_step(chunks, optimizer, scheduler, batches, args.vocab_size)
            result = static_bytes(chunks, optimizer)
            result["pp_rank"] = ps.get_pipeline_model_parallel_rank()
            # Made at the first step and kept (megatron's sequence-parallel all-gather buffer): part of what a
            # step adds over the static memory, though the profiled second step does not allocate it again.
            result["persistent"] = sum(t.numel() * t.element_size() for t in _global_buffers())
            if case.get("profile"):
                with tempfile.TemporaryDirectory() as tmp:
                    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                        train_step(chunks, optimizer, scheduler, batches, args.vocab_size)
                    prof.export_chrome_trace(f"{tmp}/trace.json")
                    result["dynamic_peak"] = _peak_of_trace(f"{tmp}/trace.json")
            found[(index, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)] = result
            del chunks, optimizer, scheduler
    finally:
        destroy_distributed()
    return found


def run_measurements(cases: list[dict], data_path, output_dir, world_size: int) -> dict:
    from megatron_swift.distributed import run_workers

    merged = {}
    for result in run_workers(measure_cases, world_size, cases, str(data_path), str(output_dir)):
        merged.update(result)
    return merged
