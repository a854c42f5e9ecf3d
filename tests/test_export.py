"""The streaming exporter (mcore-to-hf): planned shards, region reads, parallel writers, bounded memory, LoRA merge."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.checkpoint.shards import PlannedTensor, ShardFileWriter, plan_shards, write_index
from tests.test_roundtrip import _hf_tensors, assert_bit_exact

ROOT = Path(__file__).resolve().parents[1]
DATA = "examples/data/sft_sample.jsonl"


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"b.weight": (5, 3), "a.bias": (7,), "scalar": (), "empty": (0, 4), "z.weight": (2, 2, 3)}
    return {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in shapes.items()}


def test_a_planned_shard_is_byte_identical_to_save_file(tmp_path):
    tensors = _tensors()
    planned = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    (layout,) = plan_shards([planned], max_shard_bytes=1 << 20)
    names = list(tensors)
    random.Random(0).shuffle(names)  # tensors arrive in rule order, not file order
    with ShardFileWriter(tmp_path, layout) as writer:
        for name in names:
            writer.write(name, tensors[name])
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / layout.file).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_the_shard_writer_refuses_what_the_plan_does_not_say(tmp_path):
    tensors = _tensors()
    (layout,) = plan_shards([[PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]], 1 << 20)
    writer = ShardFileWriter(tmp_path, layout)
    with pytest.raises(ValueError, match=r"b.weight is torch.float32 \[5, 3\], planned torch.bfloat16"):
        writer.write("b.weight", tensors["b.weight"].float())
    with pytest.raises(KeyError, match="not planned"):
        writer.write("c.weight", tensors["b.weight"])
    writer.write("b.weight", tensors["b.weight"])
    with pytest.raises(ValueError, match="written twice"):
        writer.write("b.weight", tensors["b.weight"])
    with pytest.raises(RuntimeError, match=r"4 planned tensor\(s\) never written: a.bias, empty, scalar"):
        writer.close()


def test_shards_keep_each_rule_whole_and_respect_the_size_bound(tmp_path):
    groups = [[PlannedTensor(f"l{i}.{p}", torch.float32, (10,)) for p in "qkv"] for i in range(5)]  # 120 B each
    layouts = plan_shards(groups, max_shard_bytes=250)
    assert [len(layout.tensors) for layout in layouts] == [6, 6, 3]
    assert [layout.file for layout in layouts][-1] == "model-00003-of-00003.safetensors"
    # 200 bytes would fit five tensors, but that would put l1's q/k/v into two files
    files_of_rule = {}
    for layout in plan_shards(groups, max_shard_bytes=200):
        for tensor in layout.tensors:
            files_of_rule.setdefault(tensor.name.split(".")[0], set()).add(layout.file)
    assert len(files_of_rule) == 5 and all(len(files) == 1 for files in files_of_rule.values())
    assert plan_shards([[PlannedTensor("big", torch.float32, (100,))]], 250)[0].nbytes == 400  # alone, not dropped
    write_index(tmp_path, layouts)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 600 and index["weight_map"]["l4.v"] == "model-00003-of-00003.safetensors"
    with pytest.raises(ValueError, match="planned twice"):
        plan_shards([groups[0], groups[0]], 250)


# Saved from another layout, exported with several workers: each region is assembled from the pieces the
# save wrote (TP-split weights, EP-split experts, PP-split layers, the tied output layer of the last stage).
LAYOUTS = [
    ("qwen2", {"tensor_model_parallel_size": 2}, {"tie_word_embeddings": True}),
    pytest.param("qwen3_moe", {"expert_model_parallel_size": 2}, {}, marks=pytest.mark.slow),
    pytest.param("llama", {"pipeline_model_parallel_size": 2}, {"tie_word_embeddings": True}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("family", "parallel", "overrides"), LAYOUTS, ids=["qwen2", "qwen3_moe", "llama"])
def test_export_of_a_parallel_save_with_workers_is_bit_exact(family, parallel, overrides, tmp_path):
    from converters.convert import hf_to_mcore, mcore_to_hf
    from megatron_swift.config import ParallelConfig
    from megatron_swift.models.tiny import make_tiny_model

    source = make_tiny_model(family, tmp_path / "src", seed=3, dtype=torch.bfloat16, **overrides)
    mcore = hf_to_mcore(source, tmp_path / "mcore", ParallelConfig(**parallel))
    exported = mcore_to_hf(mcore, tmp_path / "hf", max_shard_bytes=100_000, workers=3)
    assert len(list(exported.glob("model-*.safetensors"))) >= 3  # several files, so every worker wrote some
    assert_bit_exact(source, exported)


def test_each_stored_tensor_is_read_once(converted, tmp_path, monkeypatch):
    from converters.convert import mcore_to_hf
    from megatron_swift.checkpoint.distcp import DistcpReader

    reads = []
    original = DistcpReader.read

    def counting(self, key, offsets, sizes):
        reads.append((key, tuple(offsets)))
        return original(self, key, offsets, sizes)

    monkeypatch.setattr(DistcpReader, "read", counting)
    mcore_to_hf(converted["qwen3_moe"], tmp_path / "hf")
    assert len(reads) == len(set(reads))
    stored = DistcpReader(converted["qwen3_moe"] / "model")
    tensors = {k for k in stored.metadata.state_dict_metadata if stored.shape(k) is not None}
    assert {key for key, _ in reads} == tensors


def test_an_export_that_does_not_fit_fails_before_writing(converted, tmp_path):
    from converters.__main__ import main

    ckpt = tmp_path / "mcore"
    shutil.copytree(converted["llama"], ckpt)
    config = json.loads((ckpt / "hf" / "config.json").read_text())
    (ckpt / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError) as failure:
        from converters.convert import mcore_to_hf

        mcore_to_hf(ckpt, tmp_path / "out")
    message = str(failure.value)
    assert message.startswith(f"{ckpt / 'model'}: does not fit this model; 2 problem(s)")  # layers are stacked
    assert "decoder.layers.mlp.linear_fc1.weight: stored with shape [4, 320, 64], the model built from " \
           "hf/config.json expects [4, 192, 64]" in message  # fmt: skip
    assert main(["mcore-to-hf", "--mcore", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from converters.convert import model_args_for_checkpoint
from megatron_swift.checkpoint.export import build_meta_chunks, plan_export, write_export
from megatron_swift.checkpoint.mcore import model_weights_dir
from megatron_swift.config import ParallelConfig
from megatron_swift.distributed import destroy_distributed, init_distributed
from megatron_swift.models import dtype_from_name

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
meta, args = model_args_for_checkpoint(ckpt)
init_distributed(ParallelConfig())
chunks = build_meta_chunks(args, dtype_from_name(meta["dtype"]))
plan = plan_export(chunks[0], args, model_weights_dir(ckpt), dtype_from_name(meta["dtype"]), 1 << 30)
destroy_distributed()
out.mkdir()
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
write_export(plan, out)
largest = max(t.nbytes for layout in plan.layouts for t in layout.tensors)
print(json.dumps({"growth": (kib("VmHWM") - before) * 1024, "largest": largest, "total": plan.nbytes}))
"""


def test_export_memory_is_a_few_largest_tensors_not_the_model(tmp_path):
    from converters.convert import hf_to_mcore
    from megatron_swift.models.tiny import make_tiny_model

    source = make_tiny_model("llama", tmp_path / "src", hidden_size=512, intermediate_size=1536,
                             num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    mcore = hf_to_mcore(source, tmp_path / "mcore")
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(mcore), str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["total"] > 190e6 and probe["largest"] == 1536 * 512 * 4  # gate_proj; linear_fc1 is twice that
    # The peak grows by a few copies of the largest tensor (the fused weight read, its HF halves), not the model.
    assert probe["growth"] < 8 * probe["largest"] + 24 * 2**20, probe
    assert _hf_tensors(tmp_path / "hf").keys() == _hf_tensors(source).keys()


def _in_model_export(ckpt: Path, out_dtype: torch.dtype) -> tuple[dict, dict]:
    """What mcore-to-hf wrote before it streamed: the whole TP1 model loaded (base, adapters), then its PEFT
    adapter tensors, and after the merge its tensors through the rules. The reference the streaming export
    must equal bit for bit: (merged HF tensors, PEFT adapter tensors)."""
    from converters.convert import build_chunks, model_args_for_checkpoint
    from megatron_swift.checkpoint.engine import hf_tensors_from_chunk, load_hf_into_chunks
    from megatron_swift.checkpoint.hf import HFCheckpoint, load_hf_config
    from megatron_swift.checkpoint.mcore import full_model_weights_dir, load_model, model_weights_dir
    from megatron_swift.checkpoint.peft import apply_lora_with_adapter, peft_adapter_tensors
    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models import dtype_from_name
    from megatron_swift.tuners.lora import LoraConfig, merge_lora

    meta, args = model_args_for_checkpoint(ckpt)
    init_distributed(ParallelConfig())
    try:
        chunks = build_chunks(args, ParallelConfig(), dtype_from_name(meta["dtype"]))
        base = meta["lora"]["base"]
        if "hf" in base:
            load_hf_into_chunks(chunks, HFCheckpoint(base["hf"]), args)
        else:
            load_model(chunks, full_model_weights_dir(Path(base["load"])))
        config = LoraConfig(**meta["lora"]["config"])
        apply_lora_with_adapter(chunks, config, args, ckpt / "hf", meta["lora"]["seed"])
        load_model(chunks, model_weights_dir(ckpt))
        _, adapter = peft_adapter_tensors(chunks[0], args, config, load_hf_config(ckpt / "hf"), out_dtype)
        merge_lora(chunks)
        merged = {name: tensor.clone() for name, tensor in hf_tensors_from_chunk(chunks[0], args, out_dtype)}
        return merged, adapter
    finally:
        destroy_distributed()


@pytest.mark.parametrize(("base", "dora"), [("hf", False), ("load", False), ("hf", True)])
def test_streamed_lora_merge_equals_the_in_model_merge(base, dora, tiny_models, converted, tmp_path):
    """Frozen weights from the base (HF through the rules, or a converted checkpoint), trained ones (adapters,
    modules_to_save) from the run: the same bits as loading everything into the model and merging there; the
    adapter-only export (trained tensors only, the base never read) equals the in-model one too. DoRA: the
    magnitude read from the run, the row norms computed in the exporter as in the model."""
    from converters.convert import mcore_to_hf
    from megatron_swift.training.job import train
    from tests.train_matrix import job_for

    lora = {"rank": 4, "alpha": 8.0, "init_b_zero": False, "modules_to_save": ["output_layer"], "use_dora": dora}
    hf_dir = str(tiny_models["llama"]) if base == "hf" else None
    model = {} if base == "hf" else {"load": str(converted["llama"])}
    job = job_for(hf_dir, DATA, str(tmp_path / "out"), {}, {"train_iters": 2}, lora, **model)
    job.checkpoint.save = str(tmp_path / "ckpt")
    train(job)
    exported = _hf_tensors(mcore_to_hf(tmp_path / "ckpt", tmp_path / "merged", lora="merge", dtype="bf16"))
    adapter = _hf_tensors(mcore_to_hf(tmp_path / "ckpt", tmp_path / "adapter", lora="adapter", dtype="bf16"))
    expected, expected_adapter = _in_model_export(tmp_path / "ckpt", torch.bfloat16)
    for got, want in ((exported, expected), (adapter, expected_adapter)):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    assert any(name.endswith("lm_head.weight") for name in adapter)  # modules_to_save, read from the run
    assert any(name.endswith("lora_magnitude_vector") for name in adapter) == dora
    original = _hf_tensors(tiny_models["llama"])
    changed = [n for n in original if not torch.equal(original[n].to(torch.bfloat16), exported[n])]
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed  # it has teeth
    assert "model.layers.0.input_layernorm.weight" not in changed


class _RunsCode:
    """Unpickling this runs `Path(marker).touch()`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_the_exporter_never_runs_code_from_a_checkpoint(converted, tmp_path):
    import pickle

    from converters.convert import mcore_to_hf

    ckpt, marker = tmp_path / "mcore", tmp_path / "code-ran"
    shutil.copytree(converted["qwen2"], ckpt)
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"model/\.metadata: refused to load"):
        mcore_to_hf(ckpt, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
