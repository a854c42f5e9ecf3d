"""LoRA on megatron-core: parity across layouts, exact export (merged and PEFT), counts, resume."""

import json
import re

import pytest
import torch

from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
# B initialised non-zero so the adapter path shapes the very first step too.
LORA = {"rank": 4, "alpha": 8.0, "init_b_zero": False}
# Resume tests train with every dropout on: it draws from the RNG states a checkpoint must restore.
LORA_DROPOUT = {**LORA, "dropout": 0.1}
MODEL_DROPOUT = {"attention_dropout": 0.1, "hidden_dropout": 0.1}


TP2_SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True}


def _dora_from_peft(hf_dir, tmp_path) -> dict:
    """DoRA started from a PEFT DoRA adapter whose magnitudes are not the weight norms, so that the row-parallel
    norm's all-reduce over TP counts from the first step."""
    from tests.test_dora import peft_dora_model

    peft_dora_model(hf_dir, seed=4).save_pretrained(tmp_path / "dora")
    return {"rank": 4, "alpha": 8.0, "use_dora": True, "adapter": str(tmp_path / "dora")}


def _assert_same_losses(cases, results, expected) -> None:
    for case, losses, want in zip(cases, results, expected, strict=True):
        assert len(losses) == 3
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, want, strict=True))
        print(f"{case[1]} {'dora' if case[3].get('use_dora') else 'lora'}: worst relative loss difference {worst:.2e}")
        assert worst <= 1e-5, (case[1], losses, want)


def test_lora_parallel_layouts_match_single_process_losses(tiny_models, tmp_path):
    """LoRA at TP2+SP / TP2 / PP2 / EP2, and DoRA at TP2+SP (TP2 / PP2 in the slow suite). Full recomputation
    trains the adapters exactly as without it (one process: bitwise; TP2+SP and PP2 with the block method)."""
    llama, moe = tiny_models["llama"], tiny_models["qwen3_moe"]
    dora = _dora_from_peft(llama, tmp_path)
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    block = dict(full, recompute_method="block")
    reference = run_cases([(llama, {}, {}, LORA), (moe, {}, {}, LORA), (llama, {}, {}, dora), (llama, {}, full, LORA)],
                          DATA, tmp_path / "ref", world_size=1)  # fmt: skip
    assert reference[3] == reference[0]  # recomputed layers' adapters get their gradients
    cases = [
        (llama, TP2_SP, {}, LORA),
        (llama, {"tensor_model_parallel_size": 2}, {}, LORA),
        (llama, {"pipeline_model_parallel_size": 2}, {}, LORA),
        (moe, {"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}, {}, LORA),
        (llama, TP2_SP, {}, dora),
        (llama, TP2_SP, full, LORA),
        (llama, {"pipeline_model_parallel_size": 2}, block, LORA),
    ]
    results = run_cases(cases, DATA, tmp_path / "par", world_size=2)
    _assert_same_losses(cases, results, [reference[0]] * 3 + [reference[1], reference[2]] + [reference[0]] * 2)


@pytest.mark.slow
def test_dora_tp2_and_pp2_match_single_process_losses(tiny_models, tmp_path):
    llama = tiny_models["llama"]
    dora = _dora_from_peft(llama, tmp_path)
    (reference,) = run_cases([(llama, {}, {}, dora)], DATA, tmp_path / "ref", world_size=1)
    cases = [(llama, layout, {}, dora) for layout in ({"tensor_model_parallel_size": 2},
                                                      {"pipeline_model_parallel_size": 2})]  # fmt: skip
    _assert_same_losses(cases, run_cases(cases, DATA, tmp_path / "par", world_size=2), [reference] * 2)


def _train_lora(hf_dir, tmp_path, lora=LORA, iters=2, model=None, data=None, **train):
    from megatron_swift.training.job import train as run_training

    job = job_for(str(hf_dir), DATA, str(tmp_path / "out"), {}, {"train_iters": iters, **train}, lora, data=data,
                  **(model or {}))  # fmt: skip
    job.checkpoint.save = str(tmp_path / "ckpt")
    return run_training(job), tmp_path / "ckpt"


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# PEFT maps gate/up/down_proj of MoE models onto the routed experts, so the tiny Qwen3-MoE's dense layer 0
# MLP has no PEFT form: attention everywhere + every routed expert (as in real Qwen3-MoE, which has no dense layer).
MOE_TARGETS = ["linear_qkv", "linear_proj", r"re:\.mlp\.experts\.local_experts\.\d+\.linear_fc[12]$"]


@pytest.mark.parametrize(
    ("family", "dora"),
    [
        ("llama", False),
        ("qwen3_moe", False),
        ("llama", True),
        ("gemma3", False),
        ("gpt_oss", False),
        ("glm4_moe", False),
        ("qwen2_5_vl", False),  # PEFT on the whole vision-language model: the adapter addresses its language model
    ],
)
def test_merged_export_equals_base_plus_peft_adapter(family, dora, tiny_models, tmp_path):
    """DoRA: trained from PEFT's start (magnitude = row norms), two steps move the magnitude off the norms."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from converters.convert import mcore_to_hf

    lora = {**LORA, "target_modules": MOE_TARGETS} if family == "qwen3_moe" else {**LORA, "use_dora": dora}
    if family in ("gpt_oss", "glm4_moe"):  # experts stacked parameters in HF, not linears PEFT adapts: attention
        lora["target_modules"] = ["linear_qkv", "linear_proj"]
    # Qwen2.5-VL's chat template adds a system turn: its rows need more than 32 tokens.
    _, ckpt = _train_lora(
        tiny_models[family], tmp_path, lora=lora, data={"seq_length": 96} if family == "qwen2_5_vl" else None
    )
    merged_dir = mcore_to_hf(ckpt, tmp_path / "merged", lora="merge")
    adapter_dir = mcore_to_hf(ckpt, tmp_path / "adapter", lora="adapter")

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == LORA["rank"] and adapter_config["lora_alpha"] == LORA["alpha"]
    assert adapter_config["use_dora"] == dora
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    auto = AutoModelForImageTextToText if family == "qwen2_5_vl" else AutoModelForCausalLM
    merged = _logits(auto.from_pretrained(merged_dir, dtype=torch.float32), tokens)
    base = auto.from_pretrained(tiny_models[family], dtype=torch.float32)
    base_logits = _logits(base, tokens)
    with_adapter = _logits(PeftModel.from_pretrained(base, adapter_dir), tokens)
    print(f"merged vs adapter-in-PEFT: max abs logit difference {(merged - with_adapter).abs().max():.2e}")
    assert (merged - with_adapter).abs().max() <= 1e-4
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter changes the model: the check has teeth


def test_merge_equals_adapter_applied_model(tiny_models, tmp_path):
    """In megatron-core: logits with the adapters applied == logits after merging them into the weights."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.forward import forward_logits
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.tuners.lora import LoraLinear, merge_lora, merged_weight, unmerged_weight

    job = job_for(str(tiny_models["qwen2"]), DATA, str(tmp_path), {}, {}, LORA)
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        chunks = build_model(job, args)
        tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        adapted = forward_logits(chunks, tokens, args.vocab_size)
        wrapper = next(m for m in chunks[0].modules() if isinstance(m, LoraLinear))
        weight, lora_a, lora_b = wrapper.base_layer.weight, wrapper.lora_A.weight, wrapper.lora_B.weight
        roundtrip = unmerged_weight(merged_weight(weight, lora_a, lora_b, 2.0), lora_a, lora_b, 2.0)
        assert torch.allclose(roundtrip, weight, atol=1e-6)
        count = merge_lora(chunks)
        assert count == 16 and not any(isinstance(m, LoraLinear) for m in chunks[0].modules())
        merged = forward_logits(chunks, tokens, args.vocab_size)
    finally:
        destroy_distributed()
    assert (adapted - merged).abs().max() <= 1e-5


def _peft_trainable(hf_dir, rank):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, target_modules="all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), config)
    return model.get_nb_trainable_parameters()[0], model.config


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_linear_trainable_count_matches_peft(family, tiny_models, tmp_path):
    """Ours = PEFT's count minus what fusion shares by design: one lora_A for q/k/v (PEFT has three) and
    one for gate/up (PEFT has two), i.e. 3 x rank x hidden fewer per layer."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.tuners.lora.apply import parameter_counts

    rank = 8
    job = job_for(str(tiny_models[family]), DATA, str(tmp_path), {}, {}, {"rank": rank})
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        ours, _ = parameter_counts(build_model(job, args))
    finally:
        destroy_distributed()
    peft_count, config = _peft_trainable(tiny_models[family], rank)
    shared_by_fusion = config.num_hidden_layers * 3 * rank * config.hidden_size
    assert ours == peft_count - shared_by_fusion, (ours, peft_count, shared_by_fusion)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_resume_is_bitwise(tiny_models, tmp_path, dora):
    """6 steps straight == 3 steps, a new job resuming from the adapter-only checkpoint, 3 more (dropout on).
    DoRA with the distributed optimizer: the magnitude and its optimizer state are saved and restored."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_swift.checkpoint.mcore import latest_checkpoint

    lora, train = (
        ({**LORA_DROPOUT, "use_dora": True}, {"use_distributed_optimizer": True}) if dora else (LORA_DROPOUT, {})
    )

    def run(out, iters):
        return _train_lora(tiny_models["llama"], out, lora=lora, iters=iters, model=MODEL_DROPOUT, **train)

    straight, _ = run(tmp_path / "a", 6)
    first, ckpt = run(tmp_path / "b", 3)
    second, _ = run(tmp_path / "b", 6)
    assert [r.loss for r in first + second] == [r.loss for r in straight]
    # Only adapters (and their optimizer state) are saved: a small fraction of the model's bytes.
    stored = latest_checkpoint(ckpt) / "model_optim"
    keys = FileSystemReader(str(stored)).read_metadata().state_dict_metadata
    assert not any(key.endswith("linear_qkv.weight") for key in keys)
    assert any(key.endswith("linear_qkv.lora_magnitude_vector") for key in keys) == dora
    if not dora:  # (with the distributed optimizer, per-tensor overhead dominates the tiny model's checkpoint)
        size = sum(p.stat().st_size for p in stored.rglob("*") if p.is_file())
        assert size < 0.5 * sum(p.stat().st_size for p in tiny_models["llama"].glob("*.safetensors"))


@pytest.mark.slow  # test_lora_resume_is_bitwise covers one process in the default suite
def test_lora_resume_is_bitwise_at_dp2_and_tp2_with_dropout(tiny_models, tmp_path):
    """3 steps + resume + 3 equal 6 straight, bitwise, with attention, hidden and LoRA dropout: LoRA at DP2
    (adapters sharded by the distributed optimizer, gradient reduction and parameter all-gather overlapped)
    and at TP2 (each TP rank's own attention-dropout RNG stream). Full training resumes with dropout in
    tests/test_resume.py (kill -9)."""
    llama = tiny_models["llama"]
    overlapped = {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}
    tp2 = {"tensor_model_parallel_size": 2}
    setups = [({}, overlapped, LORA_DROPOUT), (tp2, {}, LORA_DROPOUT)]
    cases = []
    for index, (parallel, train, lora) in enumerate(setups):
        resumed, straight = ({"save": str(tmp_path / f"{name}{index}")} for name in ("resumed", "straight"))
        cases += [(llama, parallel, train, lora, MODEL_DROPOUT, resumed),
                  (llama, parallel, {**train, "train_iters": 6}, lora, MODEL_DROPOUT, resumed),
                  (llama, parallel, {**train, "train_iters": 6}, lora, MODEL_DROPOUT, straight)]  # fmt: skip
    results = run_cases(cases, DATA, tmp_path / "runs", world_size=2)
    for index, setup in enumerate(setups):
        first, second, six = results[3 * index : 3 * index + 3]
        assert len(first) == len(second) == 3 and first + second == six, setup


@pytest.mark.slow
def test_dora_resume_is_bitwise_at_dp2_and_tp2_sp_with_dropout(tiny_models, tmp_path):
    """DoRA (magnitude sharded by the distributed optimizer at DP2, with lora.dropout; split on column-parallel rows
    and summed over the sequence split of row-parallel outputs at TP2+SP, model dropout only: lora.dropout under SP
    does not resume bitwise, for LoRA as for DoRA, see the README): 3 steps + resume + 3 equal 6 straight."""
    llama = tiny_models["llama"]
    overlapped = {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}
    setups = [({}, overlapped, {**LORA_DROPOUT, "use_dora": True}),
              (TP2_SP, {"use_distributed_optimizer": True}, {**LORA, "use_dora": True})]  # fmt: skip
    cases = []
    for index, (parallel, train, dora) in enumerate(setups):
        resumed, straight = ({"save": str(tmp_path / f"{name}{index}")} for name in ("resumed", "straight"))
        cases += [(llama, parallel, train, dora, MODEL_DROPOUT, resumed),
                  (llama, parallel, {**train, "train_iters": 6}, dora, MODEL_DROPOUT, resumed),
                  (llama, parallel, {**train, "train_iters": 6}, dora, MODEL_DROPOUT, straight)]  # fmt: skip
    results = run_cases(cases, DATA, tmp_path / "runs", world_size=2)
    for index, setup in enumerate(setups):
        first, second, six = results[3 * index : 3 * index + 3]
        assert len(first) == len(second) == 3 and first + second == six, setup


@pytest.mark.slow  # a refusal rule; the resharded resume itself is in test_training's default suite
def test_resume_at_another_tp_is_refused_only_for_adapters_on_the_gated_fc1(tiny_models, tmp_path):
    """An adapter on the gated linear_fc1 (all-linear) stores lora_B in the row order of its TP split: resuming it at
    another TP is refused, naming the field. Adapters on the other linears resume at TP1 from TP2 (distributed
    optimizer) with the losses of an uninterrupted TP1 run, within 1e-5."""
    from megatron_swift.distributed.spawn import WorkerError

    llama = tiny_models["llama"]
    tp2, distopt = {"tensor_model_parallel_size": 2}, {"use_distributed_optimizer": True}
    others = {**LORA, "target_modules": ["linear_qkv", "linear_proj", "linear_fc2"]}
    resharded, refused = {"save": str(tmp_path / "others")}, {"save": str(tmp_path / "all_linear")}
    cases = [
        (llama, tp2, distopt, others, {}, resharded),
        (llama, {}, {**distopt, "train_iters": 6}, others, {}, resharded),
        (llama, {}, {**distopt, "train_iters": 6}, others),  # straight at TP1 (DP2)
        (llama, tp2, {"train_iters": 1}, LORA, {}, refused),
        (llama, {}, {"train_iters": 2}, LORA, {}, refused),
    ]
    with pytest.raises(WorkerError, match=r"gated linear_fc1 .*tensor_model_parallel_size: saved 2, now 1"):
        run_cases(cases, DATA, tmp_path / "runs", world_size=2)
    # The cases before the refused one ran to the end: their losses are in their metrics.
    resumed, straight = ([json.loads(line)["loss"] for line in (tmp_path / "runs" / f"case{i}" / "logs" /
                          "metrics.jsonl").read_text().splitlines()] for i in (1, 2))  # fmt: skip
    assert len(resumed) == 3 and len(straight) == 6
    assert resumed == pytest.approx(straight[3:], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_peft_adapter_continues_training_and_exports_back_exactly(family, tiny_models, tmp_path):
    """A PEFT adapter trained on HF (its own lora_A per projection) is taken in as is: training with lr 0
    changes nothing, so the re-exported adapter and the merged model reproduce the PEFT model's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from converters.convert import mcore_to_hf

    hf_dir = tiny_models[family]
    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (
        ["gate_proj", "up_proj", "down_proj"] if family == "llama" else []
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    if family == "qwen3_moe":
        peft_config.target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    original = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), peft_config)
    original.save_pretrained(tmp_path / "peft")
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _logits(original, tokens)

    lora = {"rank": 4, "alpha": 8.0, "adapter": str(tmp_path / "peft")}
    if family == "qwen3_moe":
        lora["target_modules"] = MOE_TARGETS
    _, ckpt = _train_lora(hf_dir, tmp_path, lora=lora, iters=1, lr=0.0, min_lr=0.0)
    merged_dir = mcore_to_hf(ckpt, tmp_path / "merged", lora="merge")
    adapter_dir = mcore_to_hf(ckpt, tmp_path / "adapter", lora="adapter")

    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), tokens)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    base_logits = _logits(base, tokens)
    reexported = _logits(PeftModel.from_pretrained(base, adapter_dir), tokens)  # wraps `base` in place
    assert (merged - expected).abs().max() <= 1e-4
    assert (reexported - expected).abs().max() <= 1e-4
    assert (expected - base_logits).abs().max() > 1e-2


def test_a_lora_checkpoint_is_not_a_base_model(tiny_models, tmp_path):
    from megatron_swift.checkpoint.hf import CheckpointError
    from megatron_swift.training.job import train

    _, ckpt = _train_lora(tiny_models["llama"], tmp_path, iters=1)
    job = job_for(None, DATA, str(tmp_path / "again"), {}, {"train_iters": 1}, load=str(ckpt))
    with pytest.raises(CheckpointError, match="holds LoRA adapters only"):
        train(job)


def test_peft_adapter_rank_mismatch_is_a_clear_error(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_swift.checkpoint.hf import CheckpointError

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"])).save_pretrained(
        tmp_path / "p"
    )
    with pytest.raises(CheckpointError, match=r"lora.rank=4 but the adapter has r=2"):
        _train_lora(tiny_models["llama"], tmp_path, lora={"rank": 4, "alpha": 8.0, "adapter": str(tmp_path / "p")})


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["q_proj"]}, "k_proj, q_proj, v_proj are fused into megatron-core's linear_qkv"),
        ({"target_modules": ["attn_out"]}, "'attn_out' is not a linear of the llama family"),
        ({"target_modules": [r"re:\.nothing\."]}, r"re:\.nothing\. matched no linear module"),
        ({"modules_to_save": ["lm_heads"]}, "'lm_heads' names no module"),
    ],
)
def test_lora_targets_that_match_nothing_are_errors(tiny_models, tmp_path, lora, message):
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.tuners.lora.layers import LoraError

    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, {}, lora)
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        with pytest.raises(LoraError, match=re.escape(message)):
            build_model(job, args)
    finally:
        destroy_distributed()


def test_only_adapters_are_optimized(tiny_models, tmp_path):
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.training.optim import wrap_for_training

    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, {}, {"modules_to_save": ["output_layer"]})
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        chunks, optimizer, _ = wrap_for_training(build_model(job, args), job)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {name for name, p in chunks[0].named_parameters() if p.requires_grad}
        assert all(n.endswith(("lora_A.weight", "lora_B.weight", "output_layer.weight")) for n in names), names
        assert len(names) == 4 * 4 * 2 + 1 and len(optimized) == len(names)
    finally:
        destroy_distributed()
