"""Vision-language training (Qwen2.5-VL, tiny) against HF transformers' Qwen2_5_VLForConditionalGeneration.

In one process: the first step's loss on a global batch of images of four sizes (two in one row) and text-only rows
equals HF's loss on the same micro-batches (HF computing its own 3-D positions); ms-swift's freezing leaves the ViT
and the aligner bitwise as they were in the export while the language model moves; a ViT learning rate of its own
moves the ViT; packed and padded global batches give the same step loss. The layouts (DP2, TP2 + SP, PP2, and the
tower trained at TP2) are in test_training.py's shared launch.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from megatron_swift.config import ConfigError
from tests.train_matrix import job_for

FAMILY = "qwen2_5_vl"
TRAIN = {"global_batch_size": 4, "micro_batch_size": 2, "train_iters": 2, "lr": 1e-3}
DATA = {"seq_length": 128, "shuffle": False}


def _train(job):
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import check_job, run_job

    args = check_job(job, 1)
    ctx = init_distributed(job.parallel, seed=job.train.seed)
    try:
        return run_job(job, ctx, args)
    finally:
        destroy_distributed()


def _first_global_batch(job, hf_dir):
    from transformers import AutoTokenizer

    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.data import build_train_data
    from megatron_swift.models import translate
    from megatron_swift.models.rope_index import model_positions
    from megatron_swift.models.tiny_processor import load_processor

    args = translate(load_hf_config(hf_dir))
    data = build_train_data(job.data, AutoTokenizer.from_pretrained(hf_dir), "sft", job.train.global_batch_size,
                            job.train.seed, processor=load_processor(hf_dir),
                            positions_fn=functools.partial(model_positions, args=args))  # fmt: skip
    return data.batches.next_microbatches(0, 1, job.train.micro_batch_size)


def hf_loss(hf_dir, micro_batches) -> float:
    """HF's token-mean loss over the micro-batches: its own forward (pixels, grids, its 3-D positions from the
    attention mask and token types), cross entropy on our labels and loss mask."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    pad, image = model.config.get_text_config().pad_token_id, model.config.image_token_id
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in micro_batches:
            ids = batch["tokens"]
            logits = model(
                input_ids=ids,
                attention_mask=(ids != pad).long(),
                mm_token_type_ids=(ids == image).int(),
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"),
            ).logits
            per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                          reduction="none")  # fmt: skip
            total += float((per_token * batch["loss_mask"].flatten()).sum())
            tokens += int(batch["loss_mask"].sum())
    return total / tokens


def test_first_step_equals_hf_and_freezing_keeps_the_tower(tiny_models, vlm_sft_data, tmp_path):
    hf_dir = tiny_models[FAMILY]
    save = tmp_path / "ckpt"
    job = job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path / "run"), {}, TRAIN, data=DATA,
                  checkpoint={"save": str(save), "save_interval": 2})  # fmt: skip
    micro_batches = _first_global_batch(job, hf_dir)
    # Unshuffled: an image row beside a text-only row, then three images of two sizes in two rows.
    sizes = {tuple(grid.tolist()) for batch in micro_batches for grid in batch["image_grid_thw"]}
    assert len(sizes) == 3 and [len(batch["image_grid_thw"]) for batch in micro_batches] == [1, 3]
    results = _train(job)
    expected = hf_loss(hf_dir, micro_batches)
    print(f"step-1 loss {results[0].loss:.7f}, HF {expected:.7f}: difference {abs(results[0].loss - expected):.2e}")
    assert abs(results[0].loss - expected) <= 1e-5, (results[0].loss, expected)

    # ms-swift's defaults (freeze_vit, freeze_aligner): the exported tower is the original bit for bit.
    changes = _exported_changes(hf_dir, save, tmp_path / "hf")
    assert changes["vit"] == 0.0 and changes["aligner"] == 0.0 and changes["llm"] > 1e-4, changes


def _exported_changes(hf_dir, save, out) -> dict[str, float]:
    """Largest |exported - original| of each part (vit, aligner, llm) after training."""
    from converters.convert import mcore_to_hf

    out = mcore_to_hf(save, out)
    exported = {name: tensor for path in out.glob("*.safetensors") for name, tensor in load_file(path).items()}
    original = {_hub_name(name): tensor for name, tensor in load_file(hf_dir / "model.safetensors").items()}
    assert exported.keys() == original.keys()
    changes = {"vit": 0.0, "aligner": 0.0, "llm": 0.0}
    for name, tensor in exported.items():
        part = "llm" if not name.startswith("visual.") else "aligner" if name.startswith("visual.merger.") else "vit"
        changes[part] = max(changes[part], float((tensor - original[name]).abs().max()))
    return changes


def _hub_name(name: str) -> str:
    """transformers 5 saves `model.language_model.*` / `model.visual.*`; the export writes the hub's names."""
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def test_vit_lr_moves_the_vit_at_its_rate_and_packing_gives_the_padded_step_loss(tiny_models, vlm_sft_data,
                                                                                   tmp_path):  # fmt: skip
    """One step over all 8 rows. Adam's first update of an element is lr x sign(gradient) (weight decay aside), so
    the largest change of each part is its learning rate: vit_lr for the ViT, train.lr for the language model,
    0 for the still-frozen aligner. The same rows packed (two documents and more a row) give the same loss."""
    from transformers import AutoTokenizer

    from megatron_swift.data import build_train_data
    from megatron_swift.models.tiny_processor import load_processor

    hf_dir = tiny_models[FAMILY]
    whole = {"global_batch_size": 8, "micro_batch_size": 4, "train_iters": 1, "lr": 1e-3, "freeze_vit": False,
             "vit_lr": 1e-2}  # fmt: skip
    save = tmp_path / "ckpt"
    padded = _train(job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path / "padded"), {}, whole, data=DATA,
                            checkpoint={"save": str(save), "save_interval": 1}))  # fmt: skip
    changes = _exported_changes(hf_dir, save, tmp_path / "hf")
    print(f"largest change per part after one step: {changes}")
    assert changes["aligner"] == 0.0
    assert changes["vit"] == pytest.approx(1e-2, rel=0.05) and changes["llm"] == pytest.approx(1e-3, rel=0.05)

    packing = {**DATA, "packing": True, "seq_length": 256}
    rows = build_train_data(job_for(str(hf_dir), str(vlm_sft_data), "", {}, whole, data=packing).data,
                            AutoTokenizer.from_pretrained(hf_dir), "sft", 8, 1234,
                            processor=load_processor(hf_dir)).num_samples  # fmt: skip
    assert rows < 8  # documents share rows
    packed = _train(job_for(str(hf_dir), str(vlm_sft_data), str(tmp_path / "packed"), {},
                            {**whole, "global_batch_size": rows, "micro_batch_size": 1}, data=packing))  # fmt: skip
    print(f"packed ({rows} rows) vs padded step loss: {packed[0].loss:.7f} vs {padded[0].loss:.7f}")
    assert abs(packed[0].loss - padded[0].loss) <= 1e-5, (packed[0].loss, padded[0].loss)
    assert packed[0].tokens == padded[0].tokens


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"freeze_vit": True, "vit_lr": 1e-4}, "train.vit_lr=0.0001: train.freeze_vit is true"),
        ({"freeze_llm": True}, "all true: nothing would be trained"),
        ({"freeze_vit": False, "train_type": "lora"}, "LoRA trains the language model's adapters only"),
        ({"task": "dpo"}, "train.task=dpo: a vision-language model"),
    ],
)
def test_preflight_refuses_what_vision_training_cannot_do(tiny_models, vlm_sft_data, tmp_path, train, message):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models[FAMILY]), str(vlm_sft_data), str(tmp_path), {}, {**TRAIN, **train}, data=DATA)
    with pytest.raises(ConfigError, match=message):
        check_job(job, 1)


def test_text_models_refuse_vision_fields(tiny_models, tmp_path):
    from megatron_swift.training.job import check_job

    job = job_for(str(tiny_models["llama"]), "examples/data/sft_sample.jsonl", str(tmp_path), {},
                  {**TRAIN, "vit_lr": 1e-4})  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.vit_lr: the model has no vision tower"):
        check_job(job, 1)


def test_part_rates_are_optimizer_groups_with_the_schedule_scaled_in_bf16(tiny_models, vlm_sft_data, tmp_path):
    """bf16 wraps the chunks (Float16Module) before the optimizer is built: the ViT's and the aligner's rates must
    still reach it, each group's min_lr scaled like its max_lr, and the logged rate is the language model's."""
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.training.optim import current_lr, wrap_for_training
    from megatron_swift.training.vision_tuning import part_of

    train = {**TRAIN, "bf16": True, "freeze_vit": False, "freeze_aligner": False, "vit_lr": 2e-4,
             "aligner_lr": 5e-4, "min_lr": 1e-4, "lr_decay_style": "cosine"}  # fmt: skip
    job = job_for(str(tiny_models[FAMILY]), str(vlm_sft_data), str(tmp_path), {}, train, data=DATA)
    args = check_job(job, 1)
    init_distributed(job.parallel, seed=job.train.seed)
    try:
        chunks = build_model(job, args)
        sizes = {"vit": 0, "aligner": 0, "llm": 0}
        for name, param in chunks[0].named_parameters():
            sizes[part_of(name, args.vision)] += param.numel()
        _, optimizer, _ = wrap_for_training(chunks, job)
        by_rate: dict[tuple, int] = {}
        for group in optimizer.param_groups:
            key = (group["max_lr"], group["min_lr"])
            by_rate[key] = by_rate.get(key, 0) + sum(param.numel() for param in group["params"])
        assert by_rate == {(1e-3, 1e-4): sizes["llm"], (2e-4, 2e-5): sizes["vit"], (5e-4, 5e-5): sizes["aligner"]}
        assert current_lr(optimizer) == next(g["lr"] for g in optimizer.param_groups if g["max_lr"] == 1e-3)
    finally:
        destroy_distributed()


def test_text_only_batches_with_a_trained_tower_and_overlapped_grad_reduce(tiny_models, tmp_path):
    """Rows without images leave a trained tower without gradients; with overlapped gradient reduction megatron-core
    launches a bucket only when all its parameters have reported, and asserts at the step's end otherwise."""
    train = {**TRAIN, "freeze_vit": False, "freeze_aligner": False}
    losses = {}
    for overlap in (False, True):
        job = job_for(str(tiny_models[FAMILY]), "examples/data/sft_sample.jsonl", str(tmp_path / str(overlap)), {},
                      {**train, "overlap_grad_reduce": overlap}, data=DATA)  # fmt: skip
        losses[overlap] = [result.loss for result in _train(job)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and len(losses[True]) == 2
