"""KTO against TRL 1.16's KTOTrainer: the same weights (a tuned policy, its base as the reference), the same items and
KL sequences, fp32. With LoRA: the base plus a PEFT adapter trained on HF (lora_B non-zero) that our run reads
(`lora.adapter`), against KTOTrainer on the same adapter through PEFT, whose reference is the same model with its
adapters disabled (TRL's `use_adapter(model, None)`: `model.disable_adapter()`), as ours.

Our numbers come from the training path (the data pipeline's global batch of 6 items, one per micro-batch, the
reference's log-probs attached by `Kto.run`, the KL pass, the per-item reports of its loss function); TRL's from
`KTOTrainer._compute_loss` on the same token ids with its per-device batch = our global batch (TRL's KL term is then
the mean over the same 6 KL sequences): its per-item losses (the tensor it takes `nanmean` of), its logged `kl` and
per-class means, the per-item rewards and log-probs from one-item calls, and the gradient of its batch loss.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_kto_data import _split
from tests.tiny_tuning import LORA_TARGETS, SHARED_A, fine_tune, fine_tune_lora
from tests.train_matrix import job_for

KTO = "examples/data/kto_sample.jsonl"
ITEMS = 6
TOL = 1e-5

# (our rlhf section = TRL's KTOConfig fields)
CASES = {
    "kto": {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.8},
    "apo_zero_unpaired": {"loss_type": ["apo_zero_unpaired"], "beta": 0.2},
}


@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    return fine_tune(tiny_models["llama"], tmp_path_factory.mktemp("tuned"), steps=6)


@pytest.fixture(scope="module")
def tuned_adapter(tiny_models, tmp_path_factory):
    return fine_tune_lora(tiny_models["llama"], tmp_path_factory.mktemp("adapter"), steps=6)


def _ours(hf_dir, tmp_path, rlhf: dict, lora: dict | None = None):
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_chunks, build_preference, check_job, check_weights, load_weights
    from megatron_swift.training.kto import REPORT
    from megatron_swift.training.optim import wrap_for_training

    job = job_for(str(hf_dir), KTO, str(tmp_path), {}, {"task": "kto", "global_batch_size": ITEMS}, lora,
                  data={"seq_length": 64, "shuffle": False}, rlhf=rlhf)  # fmt: skip
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_chunks(job, args)
        source = check_weights(job, chunks, args)  # before LoRA's adapters are on the chunks
        load_weights(job, chunks, args, source)
        kto = build_preference(job, args, chunks, source)
        data = build_train_data(job.data, AutoTokenizer.from_pretrained(hf_dir), "kto", ITEMS, 0)
        microbatches = data.batches.next_microbatches(0, 1, 1)  # the first global batch, one item per micro-batch
        batches = [{key: value.clone() for key, value in mb.items()} for mb in microbatches]
        with torch.no_grad():
            reports, kl = kto.run(chunks, microbatches, forward_only=True)
        found = [dict(zip(REPORT, report["kto"].tolist(), strict=True)) for report in reports]
        chunks, optimizer, scheduler = wrap_for_training(chunks, job)
        step = kto.train_step(chunks, optimizer, scheduler, [dict(b) for b in batches], args.vocab_size)
    finally:
        destroy_distributed()
    return found, kl, step, batches


def _trl_examples(batches: list[dict]) -> list[dict]:
    """TRL's examples from our micro-batches: prompt and completion of each completion row; KL completions by TRL's
    own rule over its batch ([c[-1]] + c[:-1], `add_kl_completion_ids`)."""
    examples = []
    for batch in batches:
        prompt, completion = _split(batch, 0)
        examples.append({"prompt_ids": prompt, "completion_ids": completion, "label": bool(batch["desirable"][0])})
    completions = [example["completion_ids"] for example in examples]
    for example, kl_completion in zip(examples, [completions[-1], *completions[:-1]], strict=True):
        example["KL_completion_ids"] = kl_completion
    return examples


def _peft_grad_norm(model) -> float:
    """The norm of a PEFT model's adapter gradients as megatron-core's fused linears hold them: one lora_A per fused
    group (its gradient the sum of the group's), lora_B stacked (the same entries)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if ".lora_A." in name:
            for group in SHARED_A:
                for member in group[1:]:
                    name = name.replace(f".{member}.", f".{group[0]}.")
        grads[name] = grads[name] + param.grad if name in grads else param.grad.clone()
    assert any(".lora_B." in name for name in grads) and all(".lora_" in name for name in grads), sorted(grads)
    return torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads.values()])).item()


def _trl(tmp_path, config: dict, batches, policy, reference=None, adapter=None):
    """TRL's numbers with the HF `policy` directory, and either a `reference` directory or (LoRA) the PEFT `adapter`
    directory on the policy, whose reference is then the policy with adapters disabled."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    if reference is not None:
        reference = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    config = {**config, "loss_type": config.get("loss_type", ["kto"])[0]}
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=ITEMS, **config)  # fmt: skip
    unused = Dataset.from_list([{"prompt": "a", "completion": "b", "label": label} for label in (True, False)])
    # LoRA: TRL wraps the model itself (`peft_config`), so its reference is the adapters-off model (a PeftModel
    # passed in would get a frozen copy of its adapter as the reference instead); the adapter's weights go in after.
    peft_config = None if adapter is None else LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=unused, peft_config=peft_config)  # fmt: skip
    if adapter is not None:
        assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(trainer.model, weights)
        assert not result.unexpected_keys and weights, result
        assert all(float(w.abs().max()) > 0 for key, w in weights.items() if "lora_B" in key)
    trainer.model.train()
    examples = _trl_examples(batches)
    # Our KL rows are TRL's KL sequences: the rotation is the same.
    theirs = trainer.data_collator(examples)
    for i, batch in enumerate(batches):
        length = int(theirs["KL_attention_mask"][i].sum())
        ours = torch.cat([batch["tokens"][1, :1], batch["labels"][1]])[:length]
        assert ours.tolist() == theirs["KL_input_ids"][i, :length].tolist(), i
    captured = []
    nanmean = torch.Tensor.nanmean

    def recording_nanmean(tensor, *args, **kwargs):  # the per-item losses TRL averages
        captured.append(tensor.detach().clone())
        return nanmean(tensor, *args, **kwargs)

    torch.Tensor.nanmean = recording_nanmean
    try:
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    finally:
        torch.Tensor.nanmean = nanmean
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    (losses,) = captured  # desirable items first, then undesirable ones, each in batch order
    order = [i for i, e in enumerate(examples) if e["label"]] + [i for i, e in enumerate(examples) if not e["label"]]
    per_item = [{"loss": float(losses[order.index(i)])} for i in range(len(examples))]
    trainer.model.zero_grad()
    loss.backward()
    loss = loss.detach()
    if adapter is not None:
        grad_norm = _peft_grad_norm(trainer.model)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                                          if p.grad is not None])).item()  # fmt: skip
    with torch.no_grad():  # each item's reward and log-prob (they do not depend on the KL term)
        for example, item in zip(examples, per_item, strict=True):
            trainer._compute_loss(trainer.model, trainer.data_collator([{**example}]), return_outputs=False)
            side = "chosen" if example["label"] else "rejected"
            item.update({key: trainer._metrics["train"][f"{key}/{side}"][-1] for key in ("rewards", "logps")})
    return per_item, logged, loss.item(), grad_norm


def _run_both(request, tiny_models, tmp_path, case: str):
    """(ours, kl, step, batches, TRL's per-item values, logged metrics, loss, grad norm) for a case: full training of
    the tuned policy against its base (`ref_model`), or `lora`: the base with the tuned PEFT adapter, adapters off as
    the reference."""
    base = tiny_models["llama"]
    if case == "lora":
        adapter = request.getfixturevalue("tuned_adapter")
        lora = {"rank": 4, "alpha": 8.0, "adapter": str(adapter)}
        ours = _ours(base, tmp_path, CASES["kto"], lora)
        return *ours, *_trl(tmp_path, CASES["kto"], ours[-1], base, adapter=adapter)
    tuned = request.getfixturevalue("tuned")
    ours = _ours(tuned, tmp_path, {"ref_model": str(base), **CASES[case]})
    return *ours, *_trl(tmp_path, CASES[case], ours[-1], tuned, reference=base)


@pytest.mark.parametrize("case", ["kto", "lora", pytest.param("apo_zero_unpaired", marks=pytest.mark.slow)])
def test_kto_per_item_values_equal_trl(request, tiny_models, tmp_path, case):
    ours, kl, step, batches, per_item, logged, trl_loss, trl_grad_norm = _run_both(request, tiny_models, tmp_path, case)
    worst = {}

    def check(key, mine, expected, scale=1.0):
        worst[key] = max(worst.get(key, 0.0), abs(mine - expected))
        # fp32 sums of per-token log-probs near -100 carry ulps of ~8e-6: 1e-5, or 1e-6 of the log-prob's size.
        assert mine == pytest.approx(expected, abs=max(TOL, 1e-6 * scale)), (case, key, mine, expected)

    labels = [bool(b["desirable"][0]) for b in batches]
    assert 0 < sum(labels) < ITEMS  # both kinds in the batch
    for mine, theirs, desirable in zip(ours, per_item, labels, strict=True):
        side = "chosen" if desirable else "rejected"
        assert mine["items"] == 1 and mine["desirable"] == desirable
        scale = abs(theirs["logps"])
        check("loss", mine["loss"], theirs["loss"])
        check(f"logps/{side}", mine[f"logps/{side}"], theirs["logps"], scale)
        check(f"rewards/{side}", mine[f"rewards/{side}"], theirs["rewards"], scale)
    if case != "apo_zero_unpaired":
        check("kl", kl, logged["kl"], 100.0)
        assert logged["kl"] > 1e-3, logged  # the policy moved: the KL term is not the clamp's zero
    else:
        assert kl == 0.0
    # The step's metrics (global means) are TRL's logged ones; its loss the mean; its gradient TRL's batch gradient.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        check(key, step.metrics[key], logged[key], 100.0)
    check("mean loss", step.loss, trl_loss)
    assert step.grad_norm == pytest.approx(trl_grad_norm, rel=1e-5), (step.grad_norm, trl_grad_norm)
    assert len({round(item["loss"], 6) for item in per_item}) > 2
    print(f"{case}: max abs diff vs TRL " + ", ".join(f"{key} {value:.1e}" for key, value in worst.items())
          + f"; grad norm {step.grad_norm:.6g} vs {trl_grad_norm:.6g}")  # fmt: skip


def test_packed_items_give_the_unpacked_per_item_values(tiny_models, tuned, tmp_path):
    """Items packed into rows (data.packing: each completion and each KL sequence its own document, the KL sequences
    in rows of their own) give the values of the same items unpacked, one per micro-batch: each item's policy and
    reference log-probs of its completion and its KL sequence, the KL term, the loss report's sums, and the step's
    gradient norm (lr 0: both steps see the same weights)."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.data.kto import KtoCollate
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, build_preference, check_job, check_weights
    from megatron_swift.training.optim import wrap_for_training
    from megatron_swift.training.preference import ReferenceModel

    data = {"seq_length": 256, "shuffle": False, "packing": True}
    train = {"task": "kto", "global_batch_size": 2, "lr": 0.0, "min_lr": 0.0}
    rlhf = {"ref_model": str(tiny_models["llama"]), **CASES["kto"]}
    job = job_for(str(tuned), KTO, str(tmp_path), {}, train, data=data, rlhf=rlhf)
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        kto = build_preference(job, args, chunks, check_weights(job, chunks, args))
        packed = build_train_data(job.data, AutoTokenizer.from_pretrained(tuned), "kto", 2, 0)
        rows = [row for row in packed.batches.items if len(row) >= 2][:2]  # rows of several whole items
        assert len(rows) == 2 and packed.stats["items_longer_than_a_row"] == 0, [len(r) for r in packed.batches.items]
        items = [item for row in rows for item in row]
        assert 0 < sum(item.desirable for item in items) < len(items)
        collate, single = packed.batches.collate, KtoCollate(256, packed.batches.collate.pad_id)

        def batches(packing: bool) -> list[dict]:
            return [collate(rows)] if packing else [single([item]) for item in items]

        found, steps = {}, {}
        for packing in (True, False):
            policy, microbatches = batches(packing), batches(packing)
            with torch.no_grad():
                ReferenceModel(chunks, adapters=False).attach_logps(policy)  # the policy's own log-probs
                reports, kl = kto.run(chunks, microbatches, forward_only=True)
            logps = [torch.cat([mb["ref_logps"].reshape(2, -1) for mb in mbs], dim=1) for mbs in (policy, microbatches)]
            found[packing] = (logps, kl, torch.stack([report["kto"] for report in reports]).sum(0))
        wrapped, optimizer, scheduler = wrap_for_training(chunks, job)
        for packing in (True, False):
            steps[packing] = kto.train_step(wrapped, optimizer, scheduler, batches(packing), args.vocab_size)
    finally:
        destroy_distributed()
    (logps, kl, total), (logps1, kl1, total1) = found[True], found[False]
    step, step1 = steps[True], steps[False]
    worst = max(float((a - b).abs().max()) for a, b in zip(logps, logps1, strict=True))
    print(f"packed vs unpacked: log-probs {worst:.1e}, kl "
          f"{abs(kl - kl1):.1e}, report {float((total - total1).abs().max()):.1e}, grad norm {step.grad_norm:.6g} vs "
          f"{step1.grad_norm:.6g}")  # fmt: skip
    for name, a, b in zip(("policy", "reference"), logps, logps1, strict=True):
        assert a.shape == (2, len(items)) and (a - b).abs().max() <= TOL, (name, (a - b).abs().max())
    assert (logps[0] - logps[1]).abs().max() > 1e-2  # the policy is not the reference
    assert kl == pytest.approx(kl1, abs=TOL) and kl > 1e-3
    assert total[1] == len(items) and total.tolist() == pytest.approx(total1.tolist(), abs=TOL)
    assert step.loss == pytest.approx(step1.loss, abs=TOL)
    assert step.grad_norm == pytest.approx(step1.grad_norm, rel=1e-5) and step.grad_norm > 0
    assert step.metrics == pytest.approx(step1.metrics, abs=TOL)
