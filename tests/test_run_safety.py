"""A training run's directories and checkpoints: bad ones get one clear error before any work, nothing already
written is damaged, loading never runs code from a checkpoint, and save_total_limit never drops `latest`."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from launch.pretrain_sft import main
from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.config import ConfigError
from megatron_swift.quiet import SUMMARY
from tests.train_matrix import job_for

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "examples" / "data" / "sft_sample.jsonl")


def _train_fails(capsys, hf: Path | None, *overrides: str) -> str:
    """The launcher's error for a job that must stop before any work: exit 2, one `error:` line, no traceback."""
    base = ["--model.hf", str(hf)] if hf else []
    code = main([*base, "--data.dataset", DATA, "--data.seq_length", "32", "--train.global_batch_size", "4",
                 "--train.train_iters", "2", *overrides])  # fmt: skip
    err = capsys.readouterr().err.removeprefix(SUMMARY + "\n")  # the quiet-notices line, first in a process
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def trained_world(tiny_models, tmp_path_factory):
    """A tiny Llama built and wrapped for training in a world of size 1, with a checkpoint of it saved."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.checkpoint import _create_empty_adam_state, save_checkpoint
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.training.optim import wrap_for_training

    root = tmp_path_factory.mktemp("world")
    job = job_for(str(tiny_models["llama"]), DATA, str(root / "out"), {}, {})
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks, optimizer, scheduler = wrap_for_training(build_model(job, args), job)
        _create_empty_adam_state(optimizer)  # the state a first step creates (saves come after steps)

        def save(save_dir: Path, iteration: int, limit: int | None = None) -> Path:
            return save_checkpoint(save_dir, iteration, chunks, optimizer, scheduler, 0, limit)

        yield {"chunks": chunks, "optimizer": optimizer, "scheduler": scheduler, "save": save, "root": root}
    finally:
        destroy_distributed()


class _RunsCode:
    """Unpickling this runs `Path(marker).touch()`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_loading_a_checkpoint_never_runs_code_from_it(trained_world, tmp_path):
    from megatron_swift.checkpoint.mcore import load_model
    from megatron_swift.training.checkpoint import load_checkpoint

    w = trained_world
    marker = tmp_path / "code-ran"
    ckpt = w["save"](tmp_path / "save", 1)
    state = [w["chunks"], w["optimizer"], w["scheduler"]]
    load_checkpoint(ckpt, *state)  # the real files load

    rng_file = ckpt / "rng" / "rank_0.pt"
    good_rng = rng_file.read_bytes()
    torch.save({"torch": _RunsCode(marker), "cuda": None, "tracker": {}}, rng_file)
    with pytest.raises(CheckpointError, match=r"rank_0\.pt: refused to load"):
        load_checkpoint(ckpt, *state)
    assert not marker.exists()
    rng_file.write_bytes(good_rng)

    metadata = ckpt / "model_optim" / ".metadata"
    metadata.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load"):
        load_checkpoint(ckpt, *state)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load"):
        load_model(w["chunks"], ckpt / "model_optim")  # model.load and mcore-to-hf read the same way
    assert not marker.exists()


def test_resume_across_ep_1_and_ep_2_without_the_distributed_optimizer_is_refused(trained_world, tmp_path):
    """torch's optimizer state comes per optimizer of megatron's chain, and the experts have one of their own only at
    EP > 1: a checkpoint recorded at EP 2 resumed at EP 1 is refused naming the field (it failed with KeyError)."""
    from megatron_swift.config import ConfigError
    from megatron_swift.training.checkpoint import load_checkpoint

    w = trained_world
    ckpt = w["save"](tmp_path / "save", 1)
    state_file = ckpt / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state["layout"]["expert_model_parallel_size"] == 1 and not state["layout"]["use_distributed_optimizer"]
    load_checkpoint(ckpt, w["chunks"], w["optimizer"], w["scheduler"])  # as saved: resumes
    state["layout"]["expert_model_parallel_size"] = 2
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"parallel\.expert_model_parallel_size: saved 2, now 1\. Resume at EP > 1"):
        load_checkpoint(ckpt, w["chunks"], w["optimizer"], w["scheduler"])


def test_save_total_limit_keeps_the_newest_writes_and_never_latest(trained_world, tmp_path):
    """`latest` moved back to iter 3 while iter 6 exists, then a run resumes and saves iter 4 with limit 1:
    iter 4 (just written, `latest`) stays; by name, iter 6 would have been kept and iter 4 deleted."""
    save, save_dir = trained_world["save"], tmp_path / "save"
    save(save_dir, 3)
    save(save_dir, 6)
    (save_dir / "latest").write_text("iter_0000003\n")
    save(save_dir, 4, limit=1)
    assert (save_dir / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000004"]
    save(save_dir, 5, limit=2)
    save(save_dir, 7, limit=2)
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000005", "iter_0000007"]


def test_a_failed_save_names_the_path_and_keeps_the_last_checkpoint(trained_world, tmp_path):
    """The file system refuses the checkpoint's bytes (a file-size limit, as a full disk or a quota would): one
    error naming the directory and the cause; `latest` and the previous checkpoint untouched, nothing left."""
    import resource

    save, save_dir = trained_world["save"], tmp_path / "save"
    save(save_dir, 1)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, limits[1]))  # Python ignores SIGXFSZ: writes fail instead
    try:
        with pytest.raises(CheckpointError) as error:
            save(save_dir, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    message = str(error.value)
    assert f"{save_dir / '.iter_0000002.tmp'}: writing checkpoint iter_0000002 failed (rank 0: " in message
    assert message.endswith("the last complete checkpoint, iter_0000001, is intact"), message
    assert (save_dir / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", "latest"]


def test_save_directory_lock_refuses_a_second_job(tiny_models, tmp_path, capsys):
    from megatron_swift.training.run_dirs import SaveDirLock

    save_dir = tmp_path / "save"
    (save_dir / ".iter_0000009.tmp" / "model_optim").mkdir(parents=True)  # left by an interrupted save
    held = SaveDirLock(save_dir)
    held.acquire()
    assert not (save_dir / ".iter_0000009.tmp").exists()
    with pytest.raises(ConfigError, match=r"another job is writing this directory \(host .* pid "):
        SaveDirLock(save_dir).acquire()
    err = _train_fails(capsys, tiny_models["llama"], "--checkpoint.output_dir", str(tmp_path / "out"),
                       "--checkpoint.save", str(save_dir))  # fmt: skip
    assert "another job is writing this directory" in err
    held.release()
    again = SaveDirLock(save_dir)
    again.acquire()
    again.release()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_save_directory_of_another_model_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.checkpoint.mcore import describe_model
    from megatron_swift.config import ParallelConfig
    from megatron_swift.models import translate

    save_dir = tmp_path / "qwen2-run"
    qwen2 = tiny_models["qwen2"]
    describe_model(save_dir, translate(load_hf_config(qwen2)), qwen2, "fp32", ParallelConfig(), 128)
    before = _snapshot(save_dir)
    err = _train_fails(capsys, tiny_models["llama"], "--checkpoint.output_dir", str(tmp_path / "out"),
                       "--checkpoint.save", str(save_dir))  # fmt: skip
    assert f"checkpoint.save={save_dir}: holds checkpoints of another model (family qwen2 (this job: llama)" in err
    assert f"model.load={save_dir}" in err  # the way out
    assert _snapshot(save_dir) == before


def test_lora_resume_against_other_base_weights_is_refused(tiny_models, tmp_path, capsys):
    """The LoRA run's metadata records its base weights' fingerprint; the same base passes, a base whose
    weights changed (same config, same path kind) is refused, naming what to do."""
    from safetensors.torch import load_file, save_file

    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.checkpoint.mcore import describe_model
    from megatron_swift.config import ParallelConfig
    from megatron_swift.models import translate
    from megatron_swift.training.job import check_job
    from megatron_swift.training.run_dirs import lora_run_meta

    base = Path(shutil.copytree(tiny_models["llama"], tmp_path / "base"))
    save_dir = tmp_path / "lora-run"
    job = job_for(str(base), DATA, str(tmp_path / "out"), {}, {}, lora={}, checkpoint={"save": str(save_dir)})
    describe_model(save_dir, translate(load_hf_config(base)), base, "fp32", ParallelConfig(), 128,
                   lora=lora_run_meta(job))  # fmt: skip
    check_job(job, 1)  # the base it trained on

    weights = base / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    err = _train_fails(capsys, base, "--train.train_type", "lora", "--checkpoint.output_dir", str(tmp_path / "out"),
                       "--checkpoint.save", str(save_dir))  # fmt: skip
    assert f"its LoRA adapters were trained on other base weights than those in {base}" in err
    assert "weights fingerprint differs" in err


@pytest.mark.parametrize("fault", ["save_is_file", "output_under_file", "latest_dangles", "no_train_state",
                                   "bad_config", "load_is_hf", "not_writable", "disk_full"])  # fmt: skip
def test_filesystem_faults_are_one_clear_error_naming_the_path(fault, tiny_models, tmp_path, capsys, monkeypatch):
    """Each fault stops the job before any data or model work, with the path in the message."""
    import megatron_swift.training.run_dirs as run_dirs

    hf = tiny_models["llama"]
    out, save = tmp_path / "out", tmp_path / "save"
    overrides = ["--checkpoint.output_dir", str(out), "--checkpoint.save", str(save)]
    if fault == "save_is_file":
        save.write_text("not a directory")
        expected = f"checkpoint.save={save}: is a file, not a directory"
    elif fault == "output_under_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
        overrides[1] = str(out)
        expected = f"checkpoint.output_dir={out}: {tmp_path / 'file'} is a file"
    elif fault in ("latest_dangles", "no_train_state"):
        (save / "iter_0000002" / "model_optim").mkdir(parents=True)
        (save / "iter_0000002" / "model_optim" / ".metadata").write_bytes(b"")
        (save / "latest").write_text("iter_0000005\n" if fault == "latest_dangles" else "iter_0000002\n")
        from megatron_swift.checkpoint.hf import load_hf_config
        from megatron_swift.checkpoint.mcore import describe_model
        from megatron_swift.config import ParallelConfig
        from megatron_swift.models import translate

        describe_model(save, translate(load_hf_config(hf)), hf, "fp32", ParallelConfig(), 128)
        dangles = fault == "latest_dangles"
        expected = ("latest names 'iter_0000005', which is not a checkpoint directory there" if dangles
                    else "iter_0000002 is incomplete (no train_state.json)")  # fmt: skip
    elif fault == "bad_config":
        hf = Path(shutil.copytree(hf, tmp_path / "llama"))
        config = json.loads((hf / "config.json").read_text())
        del config["num_hidden_layers"], config["hidden_size"]
        config["rope_scaling"] = "yes"
        (hf / "config.json").write_text(json.dumps(config))
        expected = f"{hf / 'config.json'}:"
    elif fault == "load_is_hf":
        overrides += ["--model.load", str(hf)]
        expected, hf = f"model.load={hf}: is an HF model directory, not a megatron-swift checkpoint; set model.hf", None
    elif fault == "not_writable":  # the suite may run as root, for whom every directory is writable
        monkeypatch.setattr(run_dirs.os, "access", lambda path, mode: Path(path) != tmp_path)
        expected = f"checkpoint.save={save}: cannot write in {tmp_path} (permission denied)"
    else:
        real = run_dirs.shutil.disk_usage
        monkeypatch.setattr(run_dirs.shutil, "disk_usage", lambda p: real(p)._replace(free=1024**2))
        expected = f"checkpoint.output_dir={out}: only 1 MiB free on its file system"
    err = _train_fails(capsys, hf, *overrides)
    assert expected in err, err
    assert not out.exists() or fault == "output_under_file"
