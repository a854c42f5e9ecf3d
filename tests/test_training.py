"""Training engine: parallel parity against the single-process run, preflight, learning."""

import json
from pathlib import Path

import pytest
import torch

from megatron_swift.config import ConfigError
from megatron_swift.training.job import check_job
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
REL_TOL = 1e-5

LLAMA_LAYOUTS = [
    ({"tensor_model_parallel_size": 2}, {}),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
    ({"pipeline_model_parallel_size": 2}, {}),
    ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, {}),
    ({}, {}),  # DP2 against DP1 with 2x gradient accumulation (global batch 4, micro batch 1)
    ({}, {"use_distributed_optimizer": True}),
    (
        {"tensor_model_parallel_size": 2},
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    ),
    ({"context_parallel_size": 2}, {}),  # seq 32 split into 4 chunks of 8, two per rank
]
# Their own code paths on the arithmetic of the layouts above: in the slow suite (test_more_llama_layouts_...).
LLAMA_LAYOUTS_SLOW = [
    ({"pipeline_model_parallel_size": 2, "decoder_first_pipeline_num_layers": 1}, {}),  # uneven: 1 + 3 layers
    # Overlapped DP communication with small buckets (several per model): reduction during the backward,
    # parameter all-gather during the next forward.
    ({}, {"overlap_grad_reduce": True, "ddp_bucket_size": 20000}),
    ({}, {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True,
          "ddp_bucket_size": 20000}),
    ({}, {"recompute_granularity": "selective"}),
]  # fmt: skip
MOE_LAYOUTS = [({"expert_model_parallel_size": 2}, {}), ({"pipeline_model_parallel_size": 2}, {})]
# Gemma 3 (sliding windows shorter than the sequence, (1 + w) and output norms): TP2 / CP2 / packed in the slow suite.
GEMMA3_LAYOUTS = [({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
                  ({"pipeline_model_parallel_size": 2}, {})]  # fmt: skip
# gpt-oss (sinks, biased experts): TP2 + SP with expert TP 1, the experts shared by the TP ranks (their gradients
# summed over them, models/builder.py); TP2 + SP + EP2, PP2, EP2 in the slow suite (test_gpt_oss.py). Without the
# load-balancing loss: at TP2 + SP megatron-core's differs from one process's (as test_deepseek_v3.py's).
NO_AUX = (None, {}, None, {"moe_aux_loss_coeff": 0.0})
GPT_OSS_LAYOUTS = [
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_tensor_parallel_size": 1}, {}, *NO_AUX)
]
# Qwen2.5-VL on image rows (tests/vlm_data.py; micro-batches mix image sizes and text-only rows): the language model
# trained with the tower frozen (ms-swift's defaults), and everything trained with a ViT rate of its own.
VLM_DATA = {"seq_length": 128, "shuffle": False}
VLM_TOWER_TRAINED = {"freeze_vit": False, "freeze_aligner": False, "vit_lr": 5e-4}
VLM_LAYOUTS = [({}, {}), ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
               ({"pipeline_model_parallel_size": 2}, {})]  # fmt: skip
VLM_TOWER_LAYOUTS = [({"tensor_model_parallel_size": 2, "sequence_parallel": True}, VLM_TOWER_TRAINED)]
# Qwen3-VL with everything trained: the DeepStack levels (and their mergers' gradients) over the sequence-parallel
# ranks, and with the DeepStack decoder layers on the first of two pipeline stages.
QWEN3_VL_LAYOUTS = [({"tensor_model_parallel_size": 2, "sequence_parallel": True}, VLM_TOWER_TRAINED),
                    ({"pipeline_model_parallel_size": 2}, VLM_TOWER_TRAINED)]  # fmt: skip
FAMILIES = ("llama", "mixtral", "gemma3", "gpt_oss", "qwen2_5_vl", "qwen2_5_vl_tower", "qwen3_vl_tower")


def test_parallel_layouts_match_single_process_losses(tiny_models, vlm_sft_data, tmp_path):
    llama, mixtral, gemma3, gpt_oss, vlm, qwen3_vl = (tiny_models[name] for name in (*FAMILIES[:5], "qwen3_vl"))
    on_images = (None, {}, None, None, {"dataset": [str(vlm_sft_data)], **VLM_DATA})
    references = run_cases(
        [(llama, {}, {}), (mixtral, {}, {}), (gemma3, {}, {}), (gpt_oss, {}, {}, *NO_AUX), (vlm, {}, {}, *on_images),
         (vlm, {}, VLM_TOWER_TRAINED, *on_images), (qwen3_vl, {}, VLM_TOWER_TRAINED, *on_images)], DATA,
        tmp_path / "ref", 1
    )  # fmt: skip
    reference = dict(zip(FAMILIES, references, strict=True))
    cases = [(llama, *layout) for layout in LLAMA_LAYOUTS] + [(mixtral, *layout) for layout in MOE_LAYOUTS]
    cases += [(gemma3, *layout) for layout in GEMMA3_LAYOUTS] + [(gpt_oss, *layout) for layout in GPT_OSS_LAYOUTS]
    cases += [(vlm, *layout, *on_images) for layout in VLM_LAYOUTS + VLM_TOWER_LAYOUTS]
    cases += [(qwen3_vl, *layout, *on_images) for layout in QWEN3_VL_LAYOUTS]
    names = ["llama"] * len(LLAMA_LAYOUTS) + ["mixtral"] * len(MOE_LAYOUTS) + ["gemma3"] * len(GEMMA3_LAYOUTS)
    names += ["gpt_oss"] * len(GPT_OSS_LAYOUTS) + ["qwen2_5_vl"] * len(VLM_LAYOUTS)
    names += ["qwen2_5_vl_tower"] * len(VLM_TOWER_LAYOUTS) + ["qwen3_vl_tower"] * len(QWEN3_VL_LAYOUTS)
    results = run_cases(cases, DATA, tmp_path / "par", world_size=2)
    failures = []
    for name, (_, parallel, train, *_), losses in zip(names, cases, results, strict=True):
        expected = reference[name]
        assert len(losses) == len(expected) == 3
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True))
        if worst > REL_TOL:
            failures.append((name, parallel, train, losses, expected, worst))
    assert not failures, failures
    assert reference["llama"][-1] < reference["llama"][0]  # it trains

    # The gradient too (a layout normalising it differently would still log the same loss): its norm per step.
    def grad_norms(run_dir: Path) -> list[float]:
        return [record["grad_norm"] for record in _metrics(run_dir)]

    expected_norms = {name: grad_norms(tmp_path / "ref" / f"case{i}") for i, name in enumerate(FAMILIES)}
    for index, name in enumerate(names):
        got = grad_norms(tmp_path / "par" / f"case{index}")
        assert got == pytest.approx(expected_norms[name], rel=1e-4), (cases[index][1:], got, expected_norms[name])

    # MoE: the router's load-balancing loss in the metrics, reduced over ranks, is the single process's too.
    def router_loss(run_dir: Path) -> list[float]:
        return [record["load_balancing_loss"] for record in _metrics(run_dir)]

    expected = router_loss(tmp_path / "ref" / "case1")
    assert len(expected) == 3 and all(value > 0 for value in expected), expected
    for index, name in enumerate(names):
        if name == "mixtral":
            got = router_loss(tmp_path / "par" / f"case{index}")
            assert got == pytest.approx(expected, rel=REL_TOL), (cases[index][1], got, expected)


@pytest.mark.slow
def test_more_llama_layouts_match_single_process_losses(tiny_models, tmp_path):
    llama = tiny_models["llama"]
    (expected,) = run_cases([(llama, {}, {})], DATA, tmp_path / "ref", world_size=1)
    results = run_cases([(llama, *layout) for layout in LLAMA_LAYOUTS_SLOW], DATA, tmp_path / "par", world_size=2)
    expected_norms = [record["grad_norm"] for record in _metrics(tmp_path / "ref" / "case0")]
    for index, (layout, losses) in enumerate(zip(LLAMA_LAYOUTS_SLOW, results, strict=True)):
        assert losses == pytest.approx(expected, rel=REL_TOL), (layout, losses, expected)
        norms = [record["grad_norm"] for record in _metrics(tmp_path / "par" / f"case{index}")]
        assert norms == pytest.approx(expected_norms, rel=1e-4), (layout, norms, expected_norms)


@pytest.mark.parametrize(
    ("parallel", "train", "world", "field"),
    [
        ({"tensor_model_parallel_size": 3}, {}, 3, "num_attention_heads=4 is not divisible by tensor parallel 3"),
        ({"pipeline_model_parallel_size": 3}, {}, 3, "num_hidden_layers=4 is not divisible by pipeline stages 3"),
        (
            {"pipeline_model_parallel_size": 2, "decoder_first_pipeline_num_layers": 4},
            {},
            2,
            "num_hidden_layers=4: 4 (parallel.decoder_first_pipeline_num_layers) leave 0 layers for 1 middle stages",
        ),
        ({}, {"global_batch_size": 3}, 2, "train.global_batch_size=3 is not divisible"),
        ({}, {"overlap_param_gather": True, "overlap_grad_reduce": True}, 2, "train.overlap_param_gather: needs"),
        ({"expert_model_parallel_size": 2}, {}, 2, "expert parallel 2 needs a MoE model"),
        ({"sequence_parallel": True}, {}, 1, "parallel.sequence_parallel needs tensor_model_parallel_size > 1"),
        ({}, {"fp8_format": "hybrid", "fp8_recipe": "delayed"}, 1, "train.fp8_format: FP8 needs a CUDA GPU"),
        ({}, {"min_lr": 1.0}, 1, "train.min_lr=1.0 exceeds train.lr"),
        ({}, {"lr_warmup_iters": 3}, 1, "train.lr_warmup_iters=3 must be smaller than train.train_iters=3"),
        ({}, {"eval_interval": 5}, 1, "train.eval_interval: there is no validation data"),
        ({}, {"lr_decay_style": "WSD"}, 1, "train.lr_wsd_decay_iters: lr_decay_style=WSD needs"),
        ({}, {"lr_decay_style": "WSD", "lr_wsd_decay_iters": 5}, 1, "lr_wsd_decay_iters=5 exceeds the decay"),
    ],
)
def test_preflight_names_the_field(tiny_models, tmp_path, parallel, train, world, field):
    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), parallel, train)
    with pytest.raises(ConfigError) as error:
        check_job(job, world)
    assert field in str(error.value)


@pytest.mark.slow  # a multi-bucket overlap run; the slow suite runs in CI
def test_distributed_optimizer_checkpoints_with_overlapped_gather_save_updated_weights_and_resume(
    tiny_models, tmp_path
):
    """With overlap_param_gather each DP rank holds stale copies of the others' shards until the next
    forward: a checkpoint saved right after a step must still hold every updated weight (without the sync
    they are one step old, 1e-3 off at this lr). Resuming such a checkpoint continues exactly (bitwise)."""
    from tests.test_resume import _model_tensors

    llama = tiny_models["llama"]
    overlapped = {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True,
                  "ddp_bucket_size": 20000}  # fmt: skip
    save = {name: {"save": str(tmp_path / name / "ckpt")} for name in ("plain", "overlapped", "straight")}
    save["plain"]["optimizer_layout"] = "dp_reshardable"  # the layout whose refusal is checked below
    distopt = {"use_distributed_optimizer": True}
    cases = [
        (llama, {}, distopt, None, {}, save["plain"]),
        (llama, {}, overlapped, None, {}, save["overlapped"]),
        (llama, {}, {**overlapped, "train_iters": 6}, None, {}, save["straight"]),
        (llama, {}, {**overlapped, "train_iters": 6}, None, {}, save["overlapped"]),  # resumes at step 3
    ]
    plain, first_three, straight, resumed = run_cases(cases, DATA, tmp_path / "runs", world_size=2)
    # Other buckets shard the gradients differently, so the distributed optimizer's gradient norm sums them in
    # another order: the plain run may differ in the last bits (seen: 8e-8 relative at step 3 on other weights).
    assert first_three == pytest.approx(plain, rel=1e-6, abs=0)
    assert straight[:3] == first_three  # same layout: bitwise
    assert resumed == straight[3:]  # bitwise
    saved = {name: _model_tensors(tmp_path / name / "ckpt" / "iter_0000003") for name in ("plain", "overlapped")}
    assert saved["plain"] and sorted(saved["plain"]) == sorted(saved["overlapped"])
    # Bucket boundaries differ, so reductions round differently in the last bits (measured <= 1.2e-7).
    worst = max((saved["plain"][k] - saved["overlapped"][k]).abs().max().item() for k in saved["plain"])
    assert worst <= 1e-6, worst
    # A dp_reshardable checkpoint's optimizer state is stored per DP shard: resuming it at another TP is refused,
    # naming the fields, whatever the resuming job's own optimizer_layout (the checkpoint's is read from it).
    from megatron_swift.distributed.spawn import WorkerError

    plain_dir = {"save": save["plain"]["save"]}  # resumed with the default optimizer_layout
    at_tp2 = [(llama, {"tensor_model_parallel_size": 2}, {**distopt, "train_iters": 6}, None, {}, plain_dir)]
    with pytest.raises(WorkerError, match=r"\(dp_reshardable\).*parallel\.tensor_model_parallel_size: saved 1, now 2"):
        run_cases(at_tp2, DATA, tmp_path / "tp2", world_size=2)


def _reshard_cases(tiny_models, tmp_path, which: str):
    """(cases, [(resumed index, uninterrupted index, name)], bitwise pairs) of the resume-at-another-layout runs."""
    llama, mixtral = tiny_models["llama"], tiny_models["mixtral"]
    three = {"use_distributed_optimizer": True}
    six, nine = {**three, "train_iters": 6}, {**three, "train_iters": 9}
    tp2, pp2 = {"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}
    vpp, ep2 = {**pp2, "virtual_pipeline_model_parallel_size": 2}, {"expert_model_parallel_size": 2}
    ckpt = {name: {"save": str(tmp_path / name)} for name in ("tp2", "dp", "pp2", "vpp", "ep2")}
    if which == "tp_pp":
        cases = [
            (llama, tp2, three, None, {}, ckpt["tp2"]), (llama, {}, six, None, {}, ckpt["tp2"]),
            (llama, {}, six),  # straight at DP2
            (llama, pp2, three, None, {}, ckpt["pp2"]), (llama, tp2, six, None, {}, ckpt["pp2"]),
            (llama, tp2, six),  # straight at TP2
        ]  # fmt: skip
        return cases, [(1, 2, "TP2 -> TP1"), (4, 5, "PP2 -> TP2")], []
    cases = [
        (llama, {}, three, None, {}, {**ckpt["dp"], "optimizer_layout": "dp_reshardable"}),
        (llama, {}, six, None, {}, ckpt["dp"]),  # resumes with the default layout set
        (llama, {}, six),  # straight at DP2
        (llama, vpp, three, None, {}, ckpt["vpp"]), (llama, tp2, six, None, {}, ckpt["vpp"]),
        (llama, tp2, six),  # straight at TP2
        (mixtral, ep2, three, None, {}, ckpt["ep2"]), (mixtral, {}, six, None, {}, ckpt["ep2"]),
        (mixtral, {}, six),  # straight at EP1
        (mixtral, ep2, nine, None, {}, ckpt["ep2"]),  # back at EP2 from the EP1 run's step 6
        (mixtral, ep2, nine),  # straight at EP2
    ]  # fmt: skip
    return cases, [(4, 5, "PP2 VPP2 -> TP2"), (7, 8, "EP2 -> EP1"), (9, 10, "EP1 -> EP2")], [((0, 1), 2)]


@pytest.mark.parametrize("which", ["tp_pp", pytest.param("vpp_ep_dp", marks=pytest.mark.slow)])
def test_distributed_optimizer_checkpoints_resume_at_another_tp_pp_vpp_and_ep(which, tiny_models, tmp_path):
    """The default optimizer_layout (fully_reshardable) resumes at another layout with the losses of an uninterrupted
    run there (within 1e-5): TP2 -> TP1 (DP2) and PP2 -> TP2 (default suite); PP2 with virtual stages -> TP2, and for
    the MoE model EP2 -> EP1 -> EP2 (the experts' own optimizer at EP2 is part of the dense one at EP1) (slow suite).
    A dp_reshardable checkpoint (the layout written before) still resumes at its layout, bitwise."""
    cases, resumes, bitwise = _reshard_cases(tiny_models, tmp_path, which)
    losses = run_cases(cases, DATA, tmp_path / "runs", world_size=2)
    for resumed, straight, name in resumes:
        got, expected = losses[resumed], losses[straight][-3:]
        assert len(got) == 3, name
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
        assert worst <= REL_TOL, (name, got, expected, worst)
    for (first, then), straight in bitwise:  # dp_reshardable, same layout
        assert losses[first] + losses[then] == losses[straight]


@pytest.mark.parametrize(
    ("layers", "parallel", "problem"),
    [
        (4, {"pipeline_model_parallel_size": 3, "decoder_first_pipeline_num_layers": 2}, None),  # 2 + 1 + 1
        (7, {"pipeline_model_parallel_size": 3, "decoder_last_pipeline_num_layers": 1}, None),  # 3 + 3 + 1
        (
            28,
            {
                "pipeline_model_parallel_size": 8,
                "decoder_first_pipeline_num_layers": 1,
                "decoder_last_pipeline_num_layers": 3,
            },
            None,
        ),
        (8, {"pipeline_model_parallel_size": 3, "decoder_first_pipeline_num_layers": 1}, "not divisible by 2 middle"),
        (
            8,
            {
                "pipeline_model_parallel_size": 3,
                "virtual_pipeline_model_parallel_size": 2,
                "decoder_first_pipeline_num_layers": 2,
            },
            "not divisible by 2 middle stages x virtual pipeline 2",
        ),
        (
            4,
            {
                "pipeline_model_parallel_size": 2,
                "decoder_first_pipeline_num_layers": 2,
                "decoder_last_pipeline_num_layers": 1,
            },
            "leave 1 layers for 0 middle stages",
        ),
        (6, {"pipeline_model_parallel_size": 4}, "not divisible by pipeline stages 4"),
    ],
)
def test_uneven_pipeline_split_follows_megatron_rules(layers, parallel, problem):
    """Preflight's arithmetic for the uneven split; each accepted case also builds megatron's TransformerConfig."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_swift.config import ParallelConfig
    from megatron_swift.models.layout import pipeline_split_problems

    config = ParallelConfig(**parallel)
    found = pipeline_split_problems(layers, config)
    if problem is not None:
        assert len(found) == 1 and problem in found[0], found
        return
    assert found == []
    TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1, pipeline_dtype=torch.float32,
                      pipeline_model_parallel_size=config.pipeline_model_parallel_size,
                      virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
                      num_layers_in_first_pipeline_stage=config.decoder_first_pipeline_num_layers,
                      num_layers_in_last_pipeline_stage=config.decoder_last_pipeline_num_layers)  # fmt: skip


def test_preflight_refuses_context_parallel_without_a_cp_attention(tiny_models, tmp_path):
    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {"context_parallel_size": 2}, {}, attention="local")
    with pytest.raises(ConfigError, match="context_parallel_size > 1 needs Transformer Engine attention"):
        check_job(job, 2)


def test_preflight_reports_every_problem_at_once(tiny_models, tmp_path):
    job = job_for(
        str(tiny_models["llama"]),
        DATA,
        str(tmp_path),
        {"tensor_model_parallel_size": 3},
        {"global_batch_size": 5, "bf16": True, "fp16": True},
    )
    with pytest.raises(ConfigError) as error:
        check_job(job, 3)
    message = str(error.value)
    assert "train.bf16 and train.fp16" in message and "num_attention_heads=4" in message


def test_first_step_loss_and_gradient_equal_hf_with_padded_vocab(tiny_models, tmp_path):
    """The HF model is the reference: our step-1 loss is its token-mean loss on the same global batch (4 micro-
    batches of samples with different numbers of loss tokens), and so is the gradient: its norm is that of HF's
    masked-mean loss. The logged loss alone would not see gradients normalised per micro-batch or over every
    position, and Adam's update hardly changes with the gradient's scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.training.job import train

    hf = tiny_models["qwen2"]  # tied embeddings; vocab 384 padded to 512 below
    job = job_for(str(hf), DATA, str(tmp_path), {}, {"train_iters": 1}, make_vocab_size_divisible_by=256)
    (result,) = train(job)

    data = build_train_data(
        job.data, AutoTokenizer.from_pretrained(hf), "sft", job.train.global_batch_size, job.train.seed
    )
    batch = data.batches.next_microbatches(0, 1, 4)[0]
    tokens_per_sample = batch["loss_mask"].sum(dim=1)
    assert len(set(tokens_per_sample.tolist())) > 1 and (tokens_per_sample < batch["tokens"].shape[1]).all()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    logits = model(batch["tokens"]).logits
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert abs(result.loss - loss.item()) / loss.item() < 1e-5, (result.loss, loss.item())
    assert abs(result.grad_norm - grad_norm) / grad_norm < 1e-4, (result.grad_norm, grad_norm)


def test_tiny_model_overfits_sixteen_samples(tiny_models, tmp_path):
    from megatron_swift.training.job import train

    data = tmp_path / "sft16.jsonl"
    data.write_text("".join(Path(DATA).read_text().splitlines(keepends=True)[:16]))
    job = job_for(
        str(tiny_models["llama"]),
        str(data),
        str(tmp_path),
        {},
        {"global_batch_size": 16, "micro_batch_size": 4, "train_iters": 50, "lr": 3e-3, "weight_decay": 0.0},
    )
    job.data.seq_length = 64
    losses = [r.loss for r in train(job)]
    assert losses[-1] < 0.1 * losses[0], losses
    metrics = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 50 and {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mem_gb", "mfu"} <= set(
        json.loads(metrics[-1])
    )
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_trained_checkpoint_exports_to_hf_with_matching_logits(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from converters.check import check
    from converters.convert import mcore_to_hf
    from megatron_swift.training.job import train

    job = job_for(str(tiny_models["qwen3"]), DATA, str(tmp_path), {}, {"train_iters": 2})
    job.checkpoint.save = str(tmp_path / "checkpoints")
    train(job)
    exported = mcore_to_hf(job.checkpoint.save, tmp_path / "hf-tuned")
    result = check(exported, job.checkpoint.save)
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0, result
    original = check(tiny_models["qwen3"], job.checkpoint.save)
    assert original["max_abs_diff"] > 1e-3  # the export holds the trained weights, not the original ones
    _, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info


def test_flops_convention_against_the_hf_models_own_matrices(tiny_models):
    """6 x (multiply-adds in the HF model's linear layers) + the causal attention term, counted independently."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.models import translate
    from megatron_swift.training.flops import flops_per_token, peak_flops

    for name in ("llama", "qwen3_moe", "deepseek_v3", "gemma3"):
        config = load_hf_config(tiny_models[name])
        model = AutoModelForCausalLM.from_pretrained(tiny_models[name])
        args = translate(config)
        seq = 64
        linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        if config.model_type in ("qwen3_moe", "deepseek_v3"):
            # transformers 5 keeps experts as fused 3-D tensors and the router outside nn.Linear:
            # add the router and the top-k experts a token runs through.
            experts, dense = (config.num_experts, len(config.mlp_only_layers)) if name == "qwen3_moe" else (
                config.n_routed_experts, config.first_k_dense_replace)  # fmt: skip
            expert = 3 * config.hidden_size * config.moe_intermediate_size
            linear += (config.num_hidden_layers - dense) * (
                experts * config.hidden_size + config.num_experts_per_tok * expert
            )
        if name == "deepseek_v3":  # MLA: scores over the q/k head size (nope + rope), the sum over the value heads
            per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
            attention = config.num_hidden_layers * 2 * (seq / 2) * config.num_attention_heads * per_head
        else:  # Gemma 3's sliding-window layers: on average W - W^2 / (2 seq) keys (flops.py), the others seq / 2
            head_dim = args.transformer["kv_channels"]
            window = getattr(config, "sliding_window", None) or seq
            keys = [
                window - window**2 / (2 * seq) if kind == "sliding_attention" and window < seq else seq / 2
                for kind in getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
            ]
            attention = sum(keys) * 2 * 2 * config.num_attention_heads * head_dim
        assert flops_per_token(args.transformer, args.vocab_size, seq) == pytest.approx(3 * (2 * linear + attention))
        lora = flops_per_token(args.transformer, args.vocab_size, seq, frozen_weights=True)
        assert lora == pytest.approx(2 * (2 * linear + attention))
    assert peak_flops("NVIDIA H200", "bf16") == 989e12 and peak_flops("Some CPU", "bf16") is None


def test_pretraining_task_trains_on_text(tiny_models, tmp_path):
    from megatron_swift.training.job import train

    job = job_for(str(tiny_models["mistral"]), "examples/data/pretrain_sample.jsonl", str(tmp_path), {},
                  {"task": "pretrain", "train_iters": 4})  # fmt: skip
    results = train(job)
    assert len(results) == 4 and results[-1].loss < results[0].loss
    assert all(r.tokens == 4 * 32 for r in results)  # every token of a pretraining window is a target


def test_checkpoint_without_optimizer_state_is_smaller_and_refuses_resume(tiny_models, tmp_path):
    """checkpoint.no_save_optim writes the same model weights without Adam's state; resuming it is refused."""
    from megatron_swift.distributed.spawn import WorkerError
    from tests.test_resume import _model_tensors

    llama = tiny_models["llama"]
    weights_only, full = {"save": str(tmp_path / "weights"), "no_save_optim": True}, {"save": str(tmp_path / "full")}
    run_cases([(llama, {}, {}, None, {}, weights_only), (llama, {}, {}, None, {}, full)], DATA, tmp_path, world_size=1)

    def size(name: str) -> int:
        return sum(
            f.stat().st_size for f in (tmp_path / name / "iter_0000003" / "model_optim").rglob("*") if f.is_file()
        )

    assert size("weights") < 0.5 * size("full"), (size("weights"), size("full"))
    saved = {name: _model_tensors(tmp_path / name / "iter_0000003") for name in ("weights", "full")}
    assert saved["weights"] and sorted(saved["weights"]) == sorted(saved["full"])
    assert all(torch.equal(saved["weights"][k], saved["full"][k]) for k in saved["full"])
    with pytest.raises((WorkerError, ConfigError), match=r"saved with checkpoint\.no_save_optim"):
        run_cases([(llama, {}, {"train_iters": 6}, None, {}, weights_only)], DATA, tmp_path / "again", world_size=1)


@pytest.mark.parametrize("train", [{}, {"use_distributed_optimizer": True}])
def test_torch_adam_runs_its_fused_kernel(tiny_models, tmp_path, train):
    """Without Apex/TE megatron-core falls back to torch's AdamW; ours then runs torch's fused kernel."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model
    from megatron_swift.training.optim import inner_optimizers, wrap_for_training

    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, train)
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        _, optimizer, _ = wrap_for_training(build_model(job, args), job)
        inner = [chained.optimizer for chained in inner_optimizers(optimizer)]
        assert inner and all(type(adam) is torch.optim.AdamW for adam in inner)
        assert all(group["fused"] and not group["foreach"] for adam in inner for group in adam.param_groups)
    finally:
        destroy_distributed()


def test_ending_a_run_clears_megatron_moe_loss_tracker():
    """The tracker is process-global and sized by the first MoE model: a later run with more layers
    in the same process (a test, a benchmark) would index past its end."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, save_to_aux_losses_tracker

    from megatron_swift.distributed import destroy_distributed

    save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(1.0), layer_number=2, num_layers=2)
    destroy_distributed()
    save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(1.0), layer_number=4, num_layers=4)
    assert get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].tolist() == [0, 0, 0, 1.0]
    destroy_distributed()


@pytest.mark.parametrize(
    ("types", "coeffs", "z_loss", "expected"),
    [
        ("aux_loss", 0.01, None, ["load_balancing_loss"]),
        ("aux_loss", 0.0, None, []),  # the router computes no loss with coefficient 0
        (
            ["aux_loss", "seq_aux_loss"],
            [0.01, 0.001],
            1e-3,
            ["load_balancing_loss", "seq_load_balancing_loss", "z_loss"],
        ),
        ("sinkhorn", 0.0, None, []),
    ],
)
def test_tracked_router_losses_follow_megatron_config(types, coeffs, z_loss, expected):
    from types import SimpleNamespace

    from megatron_swift.training.moe_metrics import tracked_losses

    config = SimpleNamespace(num_moe_experts=4, moe_router_load_balancing_type=types, moe_aux_loss_coeff=coeffs,
                             moe_z_loss_coeff=z_loss)  # fmt: skip
    assert tracked_losses(config) == expected
    assert tracked_losses(SimpleNamespace(num_moe_experts=None)) == []


def test_router_loss_equals_hf_load_balancing_loss(tmp_path):
    """One MoE layer, one micro-batch: the logged loss is HF's `aux_loss` (which sums over the top-k slots,
    so it is top-k times megatron's normalisation)."""
    from transformers import AutoModelForCausalLM

    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models.tiny import make_tiny_model
    from megatron_swift.training.job import build_model
    from megatron_swift.training.moe_metrics import router_losses

    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", num_hidden_layers=1, mlp_only_layers=[])
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    hf_aux = float(hf_model(tokens, output_router_logits=True).aux_loss)

    job = job_for(str(hf_dir), DATA, str(tmp_path / "run"), {}, {})
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        (model,) = build_model(job, args)
        model.train()
        position_ids = torch.arange(32).unsqueeze(0).expand_as(tokens)
        model(tokens, position_ids, None)  # training mode with grad: the router computes its loss
        logged = router_losses(model.config, num_microbatches=1)
    finally:
        destroy_distributed()
    assert logged["load_balancing_loss"] * hf_model.config.num_experts_per_tok == pytest.approx(hf_aux, rel=1e-5)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_moe_options_train_and_match_across_expert_parallel(tiny_models, tmp_path):
    """Capacity with token dropping changes the forward and is the same at EP2; the z-loss and a zero
    load-balancing coefficient change only the gradients, and the metrics say which losses the router had."""
    mixtral = tiny_models["mixtral"]
    capacity = {"moe_expert_capacity_factor": 1.0}
    z_only = {"moe_z_loss_coeff": 1e-3, "moe_aux_loss_coeff": 0.0}
    cases = [(mixtral, {}, {}), (mixtral, {}, {}, None, {}, None, capacity), (mixtral, {}, {}, None, {}, None, z_only)]
    dropless, dropping, z_loss = run_cases(cases, DATA, tmp_path / "one", world_size=1)
    (dropping_ep2,) = run_cases(
        [(mixtral, {"expert_model_parallel_size": 2}, {}, None, {}, None, capacity)], DATA, tmp_path / "ep2", 2
    )
    assert dropping[0] != pytest.approx(dropless[0], rel=1e-4)  # tokens were dropped
    assert dropping_ep2 == pytest.approx(dropping, rel=REL_TOL)
    assert z_loss[0] == dropless[0] and z_loss[1] != pytest.approx(dropless[1], rel=1e-6)
    records = _metrics(tmp_path / "one" / "case2")
    assert all(r["z_loss"] > 0 and "load_balancing_loss" not in r for r in records), records


def test_moe_options_are_validated(tiny_models, tmp_path):
    from megatron_swift.training.config import environment_problems

    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, {}, moe={"moe_aux_loss_coeff": 0.01})
    with pytest.raises(ConfigError, match=r"moe\.moe_aux_loss_coeff: the model has no experts"):
        check_job(job, 1)
    moe = {"moe_pad_expert_input_to_capacity": True, "moe_z_loss_coeff": -1.0, "moe_token_dispatcher_type": "alltoall"}
    job = job_for(str(tiny_models["mixtral"]), DATA, str(tmp_path), {}, {}, moe=moe)
    with pytest.raises(ConfigError) as error:
        check_job(job, 1)
    assert "moe.moe_pad_expert_input_to_capacity: needs moe.moe_expert_capacity_factor" in str(error.value)
    assert "moe.moe_z_loss_coeff=-1.0 must be >= 0" in str(error.value)
    if not torch.cuda.is_available():
        assert any("moe_token_dispatcher_type=alltoall needs a CUDA GPU" in p for p in environment_problems(job))


VALIDATION = {"split_dataset_ratio": 0.3, "seq_length": 64}


def _with_validation(hf_dir, parallel: dict, train: dict, data: dict = VALIDATION) -> tuple:
    return (hf_dir, parallel, train, None, {}, None, None, data)


def _hf_validation_loss(hf_dir, data: dict) -> tuple[float, int]:
    """HF's token-mean loss on the validation items the job's data pipeline makes, and their count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.data import build_train_data

    job = job_for(str(hf_dir), DATA, "unused", {}, {}, data=data)
    built = build_train_data(job.data, AutoTokenizer.from_pretrained(hf_dir), "sft", 4, job.train.seed)
    batch = built.eval_collate(list(built.eval_items))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(batch["tokens"]).logits
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    return float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()), len(built.eval_items)


def test_validation_loss_equals_hf_and_every_layout(tiny_models, tmp_path):
    """The validation loss: HF's on the same samples while the weights are the checkpoint's (lr 0), for a
    held-out split and for a validation file; and the single process's at PP2 and DP2 after training."""
    llama = tiny_models["llama"]
    val_file = tmp_path / "val.jsonl"  # 5 of the sample chats as a validation file of its own
    val_file.write_text("".join(Path(DATA).read_text().splitlines(keepends=True)[:5]))
    validation_file = {"val_dataset": [str(val_file)], "seq_length": 64}
    frozen = {"lr": 0.0, "train_iters": 1}
    trained = {"eval_interval": 2}  # 3 steps: evaluated after steps 2 and 3
    single = [
        _with_validation(llama, {}, frozen),
        _with_validation(llama, {}, frozen, validation_file),
        _with_validation(llama, {}, trained),
    ]
    run_cases(single, DATA, tmp_path / "one", world_size=1)
    layouts = [{"pipeline_model_parallel_size": 2}, {}]
    run_cases([_with_validation(llama, p, trained) for p in layouts], DATA, tmp_path / "two", world_size=2)

    for index, data in enumerate((VALIDATION, validation_file)):
        hf_loss, count = _hf_validation_loss(llama, data)
        assert count % 4, "the test wants a partly filled last validation batch (global batch 4)"
        assert _metrics(tmp_path / "one" / f"case{index}")[-1]["val_loss"] == pytest.approx(hf_loss, rel=1e-5)

    reference = [(r["step"], r["val_loss"]) for r in _metrics(tmp_path / "one" / "case2") if "val_loss" in r]
    assert [step for step, _ in reference] == [2, 3]
    for index in range(len(layouts)):
        got = [(r["step"], r["val_loss"]) for r in _metrics(tmp_path / "two" / f"case{index}") if "val_loss" in r]
        assert [s for s, _ in got] == [2, 3]
        assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=REL_TOL), layouts[index]


def test_validation_batches_cover_every_item_once_per_rank_split():
    from megatron_swift.training.evaluate import validation_microbatches

    def collate(rows):
        return {"tokens": torch.tensor([[r] for r in rows]), "loss_mask": torch.ones(len(rows), 1)}

    items = list(range(6))
    seen = []
    for rank in range(2):
        for group in validation_microbatches(items, collate, 4, 1, rank, 2):
            assert len(group) == 2  # every rank runs the same number of micro-batches
            seen += [int(b["tokens"][0, 0]) for b in group if b["loss_mask"].sum()]
    assert sorted(seen) == items  # fillers (masked copies of item 0) count nothing
    limited = list(validation_microbatches(items, collate, 4, 2, 0, 1, max_batches=1))  # train.eval_iters: 1
    assert len(limited) == 1 and [b["tokens"].flatten().tolist() for b in limited[0]] == [[0, 1], [2, 3]]


def test_lr_schedules_wsd_and_shorter_decay(tiny_models, tmp_path):
    """The lr each step used (metrics), against the closed forms of Megatron-LM's WSD and of a cosine decay
    over lr_decay_iters < train_iters (min_lr afterwards)."""
    import math

    llama = tiny_models["llama"]
    base = {"train_iters": 6, "lr": 1e-3, "min_lr": 1e-4}
    wsd = {**base, "lr_decay_style": "WSD", "lr_wsd_decay_style": "linear", "lr_wsd_decay_iters": 3}
    short = {**base, "lr_decay_style": "cosine", "lr_decay_iters": 4}
    run_cases([(llama, {}, wsd), (llama, {}, short)], DATA, tmp_path, world_size=1)
    span = 9e-4
    expected_wsd = [1e-3] * 4 + [1e-4 + span * 2 / 3, 1e-4 + span / 3]  # stable until step 3 of 6, then anneal
    expected_short = [1e-4 + span * 0.5 * (math.cos(math.pi * k / 4) + 1) for k in range(5)] + [1e-4]
    assert [r["lr"] for r in _metrics(tmp_path / "case0")] == pytest.approx(expected_wsd, rel=1e-9)
    assert [r["lr"] for r in _metrics(tmp_path / "case1")] == pytest.approx(expected_short, rel=1e-9)


def test_validation_data_comes_from_one_source(tiny_models, tmp_path):
    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, {"eval_interval": 1},
                  data={"split_dataset_ratio": 0.2, "val_dataset": [DATA]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.val_dataset and data\.split_dataset_ratio: validate on one"):
        check_job(job, 1)
