"""The training job: check it, build its model, load or resume, train; one function per phase.

`train(job)` is what one rank of a torchrun launch runs (launch/pretrain_sft.py is the thin entry
point); tests and benchmarks call the phases directly. Weights come straight from an HF directory
(each rank reads only its shard, no offline step) or from a megatron-swift checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from pathlib import Path

from megatron_swift.config import ConfigError
from megatron_swift.training.config import JobConfig, environment_problems, precision, preflight, preflight_warnings


def model_source(job: JobConfig) -> Path:
    """The directory holding the HF config and tokenizer of the model to train."""
    from megatron_swift.checkpoint.mcore import HF_DIR

    return Path(job.model.hf) if job.model.hf else Path(job.model.load) / HF_DIR


def check_job(job: JobConfig, world_size: int):
    """Translate the model config and check the whole job (fields, model, machine, directories, weight files)
    before any process group exists; raises ConfigError listing every problem. Reads only."""
    from megatron_swift.checkpoint.hf import CheckpointError, HFCheckpoint, load_hf_config
    from megatron_swift.models import translate
    from megatron_swift.training.run_dirs import directory_problems, model_load_problems

    if job.model.load and job.model.hf is None:
        problems = model_load_problems(job.model.load)
        if problems:
            raise ConfigError("\n  ".join([f"{len(problems)} problem(s) in the job:", *problems]))
    source = model_source(job)
    hf_config = load_hf_config(source)
    try:
        args = translate(hf_config, make_vocab_size_divisible_by=job.model.make_vocab_size_divisible_by)
    except (AttributeError, TypeError, KeyError) as exc:  # a config.json transformers read but we cannot use
        problem = f"not a usable model config ({type(exc).__name__}: {exc})"
        raise CheckpointError(f"{source / 'config.json'}: {problem}") from None
    args, reward_problems = reward_model_args(job, args)
    problems = preflight(job, world_size, args) + environment_problems(job) + directory_problems(job, args)
    problems += reward_problems
    if job.train.task in ("dpo", "kto") and job.rlhf.ref_model:  # preflight refuses it for the other tasks
        problems += reference_model_problems(job.rlhf.ref_model, args, job.model.make_vocab_size_divisible_by)
    if job.model.hf:
        try:
            HFCheckpoint(job.model.hf)  # every weight file's header and length: a truncated copy fails here
        except CheckpointError as exc:
            problems.append(f"model.hf: {exc}")
    if problems:
        raise ConfigError("\n  ".join([f"{len(problems)} problem(s) in the job:", *problems]))
    if int(os.environ.get("RANK", 0)) == 0:  # warned, never refused: an estimate is not a certainty
        for warning in preflight_warnings(job, world_size, args):
            print(f"warning: {warning}", file=sys.stderr)
    return args


def reward_model_args(job: JobConfig, args):
    """train.task rm builds the model with a reward head (models/reward.py); a reward-model checkpoint (an HF
    `*ForSequenceClassification`) trains only as one. (args, problems)."""
    import transformers

    from megatron_swift.data.pairs import RM_TASK

    if job.train.task != RM_TASK:
        problem = f"model.hf: a {args.family.reward_architecture} checkpoint (a reward model) trains with train.task rm"
        return args, [problem] if args.reward_head else []
    architecture = args.family.reward_architecture
    if job.model.load and not args.reward_head:
        return args, [f"model.load={job.model.load}: not a reward model; train.task rm starts from an HF directory "
                      "(model.hf: a causal LM, whose head is initialised, or a reward model) or from a reward "
                      "model's megatron-swift checkpoint"]  # fmt: skip
    if not hasattr(transformers, architecture):
        return args, [f"train.task=rm: transformers has no {architecture} for family {args.family.name}, so the "
                      "reward model could not be exported; use another model"]  # fmt: skip
    return dataclasses.replace(args, reward_head=True), []


def new_reward_head(args, source) -> frozenset[str]:
    """The reward head's name when the HF checkpoint (a causal LM) has none: it is initialised, not read."""
    from megatron_swift.checkpoint.hf import HFCheckpoint
    from megatron_swift.models.reward import REWARD_HEAD

    if not args.reward_head or not isinstance(source, HFCheckpoint) or REWARD_HEAD.hf_name in source.tensors:
        return frozenset()
    return frozenset({REWARD_HEAD.mcore})


def precompute_reference(job: JobConfig, preference, data, is_main: bool, cache_file: Path | None = None,
                         cached: bool = False):  # fmt: skip
    """rlhf.precompute_ref_logps: the reference's log-probs of every training and validation item, computed once
    now (also when the run resumes: from the same reference, so the values are the same) and kept with the items;
    the reference model is then dropped (a frozen copy's memory is freed). `cache_file` (training/reference_cache.py):
    `cached` (every rank sees it), they are read from it and no reference runs; else, computed, they are written
    there."""
    import time

    from megatron_swift.training import reference_cache
    from megatron_swift.training.preference import ReferenceCollate, ReferenceModel, WithReference
    from megatron_swift.training.preference import precompute_reference_logps as compute

    t, started, batches = job.train, time.perf_counter(), data.batches
    splits = {"train": (batches.items, batches.collate)}
    if data.eval_items is not None:
        splits["eval"] = (data.eval_items, data.eval_collate)
    if cached:
        stored = reference_cache.load(cache_file)
        logps = {split: stored[split] for split in splits}
        for split, (items, _) in splits.items():
            if len(logps[split]) != len(items):
                raise ValueError(f"{cache_file}: holds {len(logps[split])} {split} items, the job has {len(items)}; "
                                 "delete the file to recompute it")  # fmt: skip
    else:
        logps = {split: [item.ref_logps for item in compute(preference.reference, items, collate,
                                                           t.global_batch_size, t.micro_batch_size)]
                 for split, (items, collate) in splits.items()}  # fmt: skip
        if cache_file is not None:
            reference_cache.save(cache_file, logps)
    batches.items = [WithReference(item, value) for item, value in zip(batches.items, logps["train"], strict=True)]
    batches.collate = ReferenceCollate(batches.collate)
    if data.eval_items is not None:
        eval_items = [WithReference(item, value) for item, value in zip(data.eval_items, logps["eval"], strict=True)]
        data = dataclasses.replace(data, eval_items=eval_items, eval_collate=ReferenceCollate(data.eval_collate))
    preference.reference = ReferenceModel.precomputed()
    if is_main:
        how = f"read from {cache_file}" if cached else "precomputed"
        print(f"reference log-probs of {len(batches.items)} items {how} in {time.perf_counter() - started:.1f} s")
    return data


def reference_model_problems(ref_model: str, args, make_vocab_size_divisible_by: int) -> list[str]:
    """rlhf.ref_model: an HF directory whose weights are complete and whose model is the policy's architecture."""
    from megatron_swift.checkpoint.hf import CheckpointError, HFCheckpoint, load_hf_config
    from megatron_swift.models import translate

    try:
        HFCheckpoint(ref_model)
        ref_args = translate(load_hf_config(Path(ref_model)), make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except (CheckpointError, OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        return [f"rlhf.ref_model: {exc}"]
    if ref_args != args:
        return [f"rlhf.ref_model={ref_model}: not the policy model's architecture (its config.json differs in shape)"]
    return []


def build_chunks(job: JobConfig, args) -> list:
    """This rank's model chunks, initialised (no weights loaded yet); a vision-language model's parts that
    train.freeze_vit / freeze_aligner / freeze_llm name are frozen (training/vision_tuning.py)."""
    from megatron_swift.models import build_model_chunks, dtype_from_name, transformer_config
    from megatron_swift.training.config import transformer_overrides

    dtype = dtype_from_name(precision(job))
    # Initialisation stays on although every weight is then loaded: megatron-core marks tensor-parallel
    # weights (`tensor_model_parallel`, read by grad-norm clipping and the optimizers) only while initialising.
    overrides = transformer_overrides(job, args.is_moe)
    if args.position_embedding_type == "yarn":
        # TE's fused RoPE refuses YaRN's cos/sin scale (megatron-core's rope_utils); preflight refuses forcing it.
        overrides["apply_rope_fusion"] = False
    config = transformer_config(args, job.parallel, params_dtype=dtype, **overrides)
    model = job.model
    chunks = build_model_chunks(args, config, spec=model.spec, attention=model.attention, kernels=model.kernels,
                                fused_linear_cross_entropy=model.fused_linear_cross_entropy)  # fmt: skip
    if args.vision is not None and job.train.train_type == "full":  # LoRA freezes the whole base itself
        from megatron_swift.training.vision_tuning import freeze

        freeze(chunks, args.vision, job.train)
    return chunks


def check_weights(job: JobConfig, chunks, args):
    """The source of the model's weights, checked against the built chunks without reading a tensor (HF: every
    tensor present with the shape config.json implies; megatron-swift: a complete, safe checkpoint)."""
    from megatron_swift.checkpoint import engine
    from megatron_swift.checkpoint.hf import HFCheckpoint
    from megatron_swift.checkpoint.mcore import full_model_weights_dir
    from megatron_swift.checkpoint.safety import check_distcp_metadata

    if job.model.hf:
        source = HFCheckpoint(job.model.hf)
        engine.check_against_chunks(source, chunks, args, skip=new_reward_head(args, source))
        return source
    source = full_model_weights_dir(Path(job.model.load))
    check_distcp_metadata(source)
    return source


def load_weights(job: JobConfig, chunks, args, source) -> None:
    """Fill the chunks from `check_weights`' source, then put LoRA adapters on when the job trains them."""
    from megatron_swift.checkpoint.engine import load_hf_into_chunks
    from megatron_swift.checkpoint.mcore import load_model
    from megatron_swift.checkpoint.peft import apply_lora_with_adapter
    from megatron_swift.tuners.lora.apply import embedding_output_requires_grad

    if job.model.hf:
        head = new_reward_head(args, source)
        load_hf_into_chunks(chunks, source, args, skip=head)
        if head:  # a reward model from a causal LM: HF's initialisation of `score`, from train.seed
            from megatron_swift.models.reward import initialise_reward_head

            initialise_reward_head(chunks, args.transformer["init_method_std"], job.train.seed)
    else:
        load_model(chunks, source)
    if job.train.train_type == "lora":
        report = apply_lora_with_adapter(chunks, job.lora, args, model_source(job), job.train.seed)
        if job.train.recompute_granularity == "full":
            embedding_output_requires_grad(chunks)
        if int(os.environ.get("RANK", 0)) == 0:
            print(report.summary())


def build_model(job: JobConfig, args) -> list:
    """This rank's model chunks with their weights (and LoRA adapters) loaded."""
    chunks = build_chunks(job, args)
    load_weights(job, chunks, args, check_weights(job, chunks, args))
    return chunks


def build_preference(job: JobConfig, args, chunks: list, source, reference_cached: bool = False):
    """Preference tasks: the loss and the reference model (training/preference.py, training/kto.py; a reward model,
    training/reward.py, has no reference); None for other tasks.

    The reference is the policy's own chunks with adapters off (LoRA), nothing (`rlhf.reference_free`), or a
    frozen copy at the same layout: of `rlhf.ref_model` when set, else of the initial weights, read from the same
    source as the policy (also when the run resumes: the reference never moves)."""
    from megatron_swift.data.kto import KTO_TASK
    from megatron_swift.data.pairs import PAIR_TASKS
    from megatron_swift.training.kto import Kto, KtoLoss
    from megatron_swift.training.preference import Preference, PreferenceLoss, ReferenceModel
    from megatron_swift.training.reward import Reward, RewardLoss

    if job.train.task == "rm":  # a reward model: no reference
        return Reward(RewardLoss.from_section(job.rlhf))
    if job.train.task == KTO_TASK:
        step, loss = Kto, KtoLoss.from_section(job.rlhf)
    elif job.train.task in PAIR_TASKS:
        step, loss = Preference, PreferenceLoss.from_section(job.train.task, job.rlhf)
    else:
        return None
    if job.rlhf.reference_free or job.train.task in ("simpo", "orpo"):  # SimPO and ORPO have no reference
        return step(loss, ReferenceModel.none())
    if reference_cached:  # precompute_reference reads the log-probs
        return step(loss, ReferenceModel.none())
    if job.train.train_type == "lora" and not job.rlhf.ref_model:
        return step(loss, ReferenceModel.adapters_off(chunks))
    frozen = build_chunks(job, args)
    if job.rlhf.ref_model:  # a reference of its own (same architecture: checked in check_job)
        from megatron_swift.checkpoint import engine
        from megatron_swift.checkpoint.hf import HFCheckpoint

        reference = HFCheckpoint(job.rlhf.ref_model)
        engine.check_against_chunks(reference, frozen, args)
        engine.load_hf_into_chunks(frozen, reference, args)
    else:  # the policy's initial weights, without adapters
        load_weights(dataclasses.replace(job, train=dataclasses.replace(job.train, train_type="full")), frozen, args,
                     source)  # fmt: skip
    if job.train.bf16 or job.train.fp16:
        from megatron.core.transformer.module import Float16Module

        frozen = [Float16Module(chunk.config, chunk) for chunk in frozen]
    return step(loss, ReferenceModel.copy(frozen))


def run_job(job: JobConfig, ctx, args) -> list:
    """Build, load (or resume) and train in an initialised world; returns the step results.

    Order: the save directory's lock; the model's structure and its weight files checked against it (cheap);
    the data (a bad row fails before any weight is read); the weights or the checkpoint to resume; training.
    Nothing is written to the save directory before its first checkpoint."""
    from transformers import AutoTokenizer

    from megatron_swift.checkpoint.mcore import describe_model, latest_checkpoint
    from megatron_swift.data import build_train_data
    from megatron_swift.data.kto import KTO_TASK
    from megatron_swift.data.pairs import PAIR_TASKS
    from megatron_swift.data.pipeline import pad_token_id
    from megatron_swift.distributed import on_rank_zero_agreed
    from megatron_swift.models.tiny_processor import load_processor
    from megatron_swift.plan.runtime import startup_summary
    from megatron_swift.training import reference_cache
    from megatron_swift.training.checkpoint import load_checkpoint, save_checkpoint
    from megatron_swift.training.flops import flops_per_token
    from megatron_swift.training.loop import run_training
    from megatron_swift.training.optim import wrap_for_training
    from megatron_swift.training.run_dirs import SaveDirLock, lora_run_meta

    ckpt = job.checkpoint
    if ctx.is_main:
        print(startup_summary(job, ctx.world_size, args))
    lock = SaveDirLock(ckpt.save) if ckpt.save else None
    if lock is not None:
        on_rank_zero_agreed(lock.acquire)
    try:
        chunks = build_chunks(job, args)
        source = check_weights(job, chunks, args)
        tokenizer = AutoTokenizer.from_pretrained(model_source(job))
        if args.reward_head:  # the pad token the reward position is found with (exported as config.pad_token_id)
            args = dataclasses.replace(args, pad_token_id=pad_token_id(tokenizer))
        # A vision-language model's processor (None for a text model): its SFT rows carry images (data/multimodal.py).
        processor = load_processor(model_source(job))
        positions = None
        if args.vision is not None:  # the multimodal rope's 3-D positions of each micro-batch (models/rope_index.py)
            from megatron_swift.models.rope_index import model_positions

            positions = functools.partial(model_positions, args=args)
        data = build_train_data(job.data, tokenizer, job.train.task, job.train.global_batch_size, job.train.seed,
                                progress=ctx.is_main, processor=processor, positions_fn=positions)  # fmt: skip
        if ctx.is_main:
            print(data.summary())
        if job.train.epochs is not None:
            iters = math.ceil(job.train.epochs * data.num_samples / job.train.global_batch_size)
            job = dataclasses.replace(job, train=dataclasses.replace(job.train, train_iters=iters))
            t = job.train
            if t.lr_warmup_fraction is None and t.lr_decay_iters is None and t.lr_warmup_iters >= iters:
                raise ConfigError(
                    f"train.lr_warmup_iters={t.lr_warmup_iters} must be smaller than the {iters} iterations of "
                    f"train.epochs={t.epochs} (or use train.lr_warmup_fraction)"
                )
        batches = data.batches
        resume_from = latest_checkpoint(ckpt.load or ckpt.save) if (ckpt.load or ckpt.save) else None
        if resume_from is None or job.train.train_type == "lora":  # LoRA checkpoints hold only the adapters
            load_weights(job, chunks, args, source)
        chunks, optimizer, scheduler = wrap_for_training(chunks, job)
        cache_file, cached = None, False
        if job.train.task in (*PAIR_TASKS, KTO_TASK) and job.rlhf.precompute_ref_logps:
            cache_file = reference_cache.cache_path(job, tokenizer)
            cached = reference_cache.present_on_every_rank(cache_file)
        preference = build_preference(job, args, chunks, source, reference_cached=cached)
        if preference is not None and job.rlhf.precompute_ref_logps:
            data = precompute_reference(job, preference, data, ctx.is_main, cache_file, cached)
        start = 0
        if resume_from is not None:
            state = load_checkpoint(resume_from, chunks, optimizer, scheduler)
            start, batches.consumed_samples = state["iteration"], state["consumed_samples"]
            if ctx.is_main:
                print(f"resumed from {resume_from} at iteration {start}")
        described = []

        def save(step: int) -> None:
            if ctx.is_main and not described:  # the save directory is a checkpoint for mcore-to-hf and model.load
                describe_model(Path(ckpt.save), args, model_source(job), precision(job), job.parallel,
                               job.model.make_vocab_size_divisible_by, lora=lora_run_meta(job))  # fmt: skip
                described.append(True)
            path = save_checkpoint(ckpt.save, step, chunks, optimizer, scheduler, batches.consumed_samples,
                                   ckpt.save_total_limit, save_optimizer=not ckpt.no_save_optim,
                                   optimizer_layout=ckpt.optimizer_layout)  # fmt: skip
            if ctx.is_main:
                print(f"saved checkpoint {path}")

        flops = flops_per_token(args.transformer, args.vocab_size, job.data.seq_length, job.train.train_type == "lora")
        return run_training(job, chunks, optimizer, scheduler, batches, args.vocab_size, start_iteration=start,
                            is_main=ctx.is_main, save_fn=save if ckpt.save else None, flops_per_token=flops,
                            eval_items=data.eval_items, eval_collate=data.eval_collate,
                            preference=preference)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def train(job: JobConfig) -> list:
    """Run the whole job as one rank of a torchrun launch (or alone); returns the step results."""
    from megatron_swift.distributed import destroy_distributed, init_distributed

    args = check_job(job, int(os.environ.get("WORLD_SIZE", 1)))
    ctx = init_distributed(job.parallel, seed=job.train.seed)
    try:
        return run_job(job, ctx, args)
    finally:
        destroy_distributed()
