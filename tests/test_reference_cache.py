"""rlhf.precompute_ref_logps with data.cache_dir: the reference log-probs are cached on disk (training/
reference_cache.py); a second start (here a resume) reads them, builds no reference and runs no reference forward,
and trains bitwise as a start that computed them."""

from __future__ import annotations

import dataclasses
import json

import torch

from tests.train_matrix import job_for

DPO = "examples/data/dpo_sample.jsonl"


def _job(hf, tmp_path, name: str, cache: str, train: dict, **rlhf):
    checkpoint = {"save": str(tmp_path / name / "ckpt")}
    return job_for(str(hf), DPO, str(tmp_path / name), {}, {"task": "dpo", "lr": 5e-3, **train}, checkpoint=checkpoint,
                   data={"seq_length": 64, "cache_dir": str(tmp_path / cache), "val_dataset": [f"{DPO}#6"]},
                   rlhf={"precompute_ref_logps": True, **rlhf})  # fmt: skip


def _last_metrics(run_dir) -> dict:
    return json.loads((run_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_second_start_reads_the_cached_reference_logps_bitwise(tiny_models, tmp_path, monkeypatch):
    from megatron_swift.training import preference
    from megatron_swift.training.job import train

    calls = {"forward": 0, "copy": 0}
    compute, copy = preference.precompute_reference_logps, preference.ReferenceModel.copy.__func__

    def counted_compute(*args, **kwargs):
        calls["forward"] += 1
        return compute(*args, **kwargs)

    def counted_copy(cls, chunks):
        calls["copy"] += 1
        return copy(cls, chunks)

    monkeypatch.setattr(preference, "precompute_reference_logps", counted_compute)
    monkeypatch.setattr(preference.ReferenceModel, "copy", classmethod(counted_copy))
    llama = tiny_models["llama"]
    train(_job(llama, tmp_path, "run", "cache", {"train_iters": 1}))  # computes and writes the cache
    assert calls == {"forward": 2, "copy": 1}  # training and validation items, one frozen copy
    (cached,) = (tmp_path / "cache").glob("ref-logps-*.pt")
    train(_job(llama, tmp_path, "run", "cache", {"train_iters": 2}))  # resumes at step 1: reads the cache
    assert calls == {"forward": 2, "copy": 1}, calls  # no reference built, no reference forward
    train(_job(llama, tmp_path, "straight", "fresh", {"train_iters": 2}))  # 2 steps, computing them
    assert calls == {"forward": 4, "copy": 2}
    (fresh,) = (tmp_path / "fresh").glob("ref-logps-*.pt")
    assert fresh.name == cached.name  # the key is the job's, not the directory's
    stored, recomputed = (torch.load(path, weights_only=True) for path in (cached, fresh))
    assert stored.keys() == recomputed.keys() == {"train", "train_lengths", "eval", "eval_lengths"}
    assert all(torch.equal(stored[key], recomputed[key]) for key in stored)
    resumed, straight = _last_metrics(tmp_path / "run"), _last_metrics(tmp_path / "straight")
    assert resumed["step"] == straight["step"] == 2
    compared = [key for key in straight if key.startswith(("loss", "rewards/", "logps/", "val_", "grad_norm"))]
    assert {k: resumed[k] for k in compared} == {k: straight[k] for k in compared}


def test_the_cache_key_follows_data_and_reference_but_not_the_layout(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from megatron_swift.training.reference_cache import cache_path

    llama = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(llama)
    job = _job(llama, tmp_path, "run", "cache", {})
    key = cache_path(job, tokenizer)
    assert key.parent == tmp_path / "cache" and key.name.startswith("ref-logps-")
    layout = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, tensor_model_parallel_size=2))
    assert cache_path(layout, tokenizer) == key
    for changed in (
        dataclasses.replace(job, data=dataclasses.replace(job.data, seq_length=96)),
        dataclasses.replace(job, train=dataclasses.replace(job.train, global_batch_size=8)),
        dataclasses.replace(job, rlhf=dataclasses.replace(job.rlhf, ref_model=str(tiny_models["qwen2"]))),
        dataclasses.replace(job, train=dataclasses.replace(job.train, bf16=True)),
        dataclasses.replace(job, model=dataclasses.replace(job.model, hf=str(tiny_models["qwen2"]))),
    ):
        assert cache_path(changed, tokenizer) != key
    assert cache_path(dataclasses.replace(job, data=dataclasses.replace(job.data, cache_dir=None)), tokenizer) is None
