"""The training data interface: a `DataSection` and a tokenizer in, resumable global batches out.

    data = build_train_data(job.data, tokenizer, task, global_batch_size, seed)
    data.batches.next_microbatches(dp_rank, dp_size, micro_batch_size)  # each step
    data.batches.consumed_samples                                       # checkpointed, restored on resume

Paths: an indexed prefix (.bin/.idx) gives GPT-style windows; text rows (task=pretrain) give the
same windows over the tokenized documents; conversations give one padded sample per row, or packed
rows (packing=true, also for pretraining documents); streaming=true reads and tokenizes lazily.
Every rank builds the same data (from the cache when one is set), so all ranks agree on the order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_swift.data.batches import Batches, GlobalBatches
from megatron_swift.data.cache import SampleCache, cache_key
from megatron_swift.data.encode import Encoder, Sample, encode_rows
from megatron_swift.data.errors import BadRows, DataError
from megatron_swift.data.indexed import TokenWindows, is_indexed_prefix
from megatron_swift.data.kto import (
    KTO_TASK,
    KtoCollate,
    KtoEncoder,
    LabelledSample,
    PackedKtoCollate,
    item_positions,
    with_kl_sequences,
)
from megatron_swift.data.labels import LossPolicy, TruncationCounts, parse_role_scales, truncate
from megatron_swift.data.multimodal import (
    MediaEncoder,
    MediaPackedCollate,
    MediaPaddedCollate,
    fit_media_sample,
    image_options,
)
from megatron_swift.data.packing import PackedCollate, PaddedCollate, pack, padding_fraction
from megatron_swift.data.pairs import (
    PAIR_TASKS,
    RM_TASK,
    PackedPairCollate,
    PackedRewardPairCollate,
    PairCollate,
    PairEncoder,
    PairSample,
    RewardPairCollate,
    fit_pairs,
    pair_positions,
)
from megatron_swift.data.sources import load_rows, split_rows
from megatron_swift.data.streaming import StreamingBatches
from megatron_swift.data.templates import RENDERING, make_template


@dataclass
class TrainData:
    batches: Batches
    num_samples: int | None  # items in one epoch (packed rows when packing); None for a stream
    validation: list[Sample] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    # The validation data (held-out split or val_dataset) as the model sees it: fitted samples or pretraining
    # windows, and their collate.
    eval_items: Sequence[Sample] | None = None
    eval_collate: PaddedCollate | PairCollate | None = None

    def summary(self) -> str:
        return "data: " + ", ".join(f"{key}={value}" for key, value in self.stats.items())


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its eos (TRL's choice)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_encoder(data, tokenizer, task: str) -> Encoder | PairEncoder | KtoEncoder:
    preference = task in (*PAIR_TASKS, KTO_TASK, RM_TASK)
    template = make_template(data.template, tokenizer) if task == "sft" or preference else None
    # Preference data scores the response (the turns after the last user turn) unless loss_scale says otherwise.
    scope = "last_round" if preference and data.loss_scale == "default" else data.loss_scale
    policy = LossPolicy(scope, {"tool": 0.0, **parse_role_scales(data.role_loss_scale)})
    if task in (*PAIR_TASKS, RM_TASK):
        return PairEncoder(Encoder(tokenizer, template, policy, data.format, "sft"), task)
    if task == KTO_TASK:
        return KtoEncoder(Encoder(tokenizer, template, policy, data.format, "sft"))
    return Encoder(tokenizer, template, policy, data.format, task)


def encode_dataset(data, encoder: Encoder, seed: int, progress: bool) -> tuple[list[Sample], dict]:
    """Every row tokenized (from the cache when it holds them); bad rows raise or are skipped and counted."""
    cache = None
    if data.cache_dir:
        options = {name: getattr(data, name) for name in ("format", "loss_scale", "role_loss_scale", "skip_bad_rows")}
        options.update(task=encoder.task, seed=seed, rendering=RENDERING)
        template = encoder.template.name if encoder.template else None
        cache = SampleCache(data.cache_dir, cache_key(data.dataset, encoder.tokenizer, template, options))
        cached = cache.load()
        if cached is not None:
            samples, info = cached
            if encoder.task in ("dpo", RM_TASK):  # stored flat: chosen, rejected, chosen, ... (rm: margins in info)
                margins = info.pop("rm_margins", None) or [0.0] * (len(samples) // 2)
                samples = [PairSample(*samples[i : i + 2], margins[i // 2]) for i in range(0, len(samples), 2)]
            elif encoder.task == KTO_TASK:  # the labels are stored with the info
                samples = [LabelledSample(*item) for item in zip(samples, info.pop("kto_labels"), strict=True)]
            return samples, info
    bad = BadRows(skip=data.skip_bad_rows)
    rows = load_rows(data.dataset, seed, bad)
    samples = []
    for row, result in encode_rows(encoder, rows, data.dataset_num_proc, progress, len(rows)):
        if isinstance(result, str):
            bad.report(row.where, result)
        else:
            samples.append(result)
    if not samples:
        raise DataError(f"{', '.join(data.dataset)}: no usable rows ({bad.count} bad)")
    info = {"rows": len(rows), "bad_rows": bad.count, "bad_examples": bad.examples}
    if cache is not None:
        pairs = encoder.task in ("dpo", RM_TASK)
        flat = [side for pair in samples for side in (pair.chosen, pair.rejected)] if pairs else samples
        if encoder.task == KTO_TASK:
            flat, info = [item.sample for item in samples], {**info, "kto_labels": [item.desirable for item in samples]}
        if encoder.task == RM_TASK:
            info = {**info, "rm_margins": [pair.margin for pair in samples]}
        cache.save(flat, info)
        info.pop("kto_labels", None)
        info.pop("rm_margins", None)
    return samples, info


def fit_sample(sample: Sample, max_length: int, strategy: str, counts: TruncationCounts) -> Sample | None:
    """The sample cut to max_length by the truncation strategy; None when nothing is left to train on."""
    if len(sample.ids) <= max_length:
        return sample  # the common case; its trainable tokens were checked when it was encoded
    kept = truncate(sample.ids, sample.weights, max_length, strategy, counts)
    return Sample(*kept) if kept is not None and kept[1][1:].any() else None


def fit_samples(samples: list[Sample], max_length: int, strategy: str, stats: dict) -> list[Sample]:
    """Samples cut to max_length by the truncation strategy; those left with nothing to train on are dropped."""
    counts = TruncationCounts()
    fitted = [kept for sample in samples if (kept := fit_sample(sample, max_length, strategy, counts)) is not None]
    stats |= {"truncated": counts.truncated, "deleted_too_long": counts.deleted,
              "no_target_after_truncation": counts.no_target, "trained_samples": len(fitted)}  # fmt: skip
    if not fitted:
        raise DataError(f"no sample left to train on after truncation to {max_length} tokens; raise "
                        "data.seq_length or change data.truncation_strategy")  # fmt: skip
    return fitted


def fit_labelled(items: list[LabelledSample], data, max_length: int, chunk: int, stats: dict) -> list:
    """KTO: each conversation cut like an SFT sample, then given its KL sequence (data/kto.py)."""
    counts, labelled = TruncationCounts(), []
    for item in items:
        kept = fit_sample(item.sample, max_length, data.truncation_strategy, counts)
        if kept is not None:
            labelled.append(LabelledSample(kept, item.desirable))
    stats |= {"truncated": counts.truncated, "deleted_too_long": counts.deleted,
              "no_target_after_truncation": counts.no_target, "trained_samples": len(labelled),
              "desirable": sum(item.desirable for item in labelled)}  # fmt: skip
    if not labelled:
        raise DataError(f"no sample left to train on after truncation to {max_length} tokens; raise "
                        "data.seq_length or change data.truncation_strategy")  # fmt: skip
    return with_kl_sequences(labelled, chunk, max_length)


def validation_items(validation: list[Sample], task: str, data, max_length: int, seed: int,
                     global_batch_size: int = 1) -> Sequence[Sample]:  # fmt: skip
    """The validation samples cut like the training samples (SFT, pairs), or as pretraining windows (pretrain)."""
    source = "data.val_dataset" if data.val_dataset else f"data.split_dataset_ratio={data.split_dataset_ratio}"
    if task == KTO_TASK:
        try:
            return fit_labelled(validation, data, max_length, global_batch_size, {})
        except DataError:
            raise DataError(f"{source}: no validation row has a target left after truncation to {max_length} "
                            "tokens; validate on more (or shorter) conversations") from None  # fmt: skip
    if task in (*PAIR_TASKS, RM_TASK):
        pairs = fit_pairs(validation, max_length, data.truncation_strategy, {})
        if not pairs:
            raise DataError(f"{source}: no validation pair has a scored token left on both sides after truncation to "
                            f"{max_length} tokens; validate on more (or shorter) pairs")  # fmt: skip
        return pairs
    if task == "pretrain":
        windows = TokenWindows.from_samples(validation, data.seq_length, seed, shuffle=False)
        if not len(windows):
            raise DataError(
                f"{source}: the validation documents do not fill one window of seq_length + 1 = "
                f"{data.seq_length + 1} tokens; validate on more text"
            )
        return windows
    try:
        return fit_samples(validation, max_length, data.truncation_strategy, {})
    except DataError:
        raise DataError(
            f"{source}: no validation sample has a target left after truncation to {max_length} tokens; "
            "validate on more (or shorter) conversations"
        ) from None


def build_train_data(data, tokenizer, task: str, global_batch_size: int, seed: int, progress: bool = False,
                     processor=None, positions_fn=None) -> TrainData:  # fmt: skip
    """`data` is a training.config.DataSection; `task` is "pretrain", "sft" or a pair task (pairs.PAIR_TASKS).

    `processor`: the model's HF processor when it has an image processor (a vision-language model); SFT rows are
    then encoded by it (data/multimodal.py), images and all. `positions_fn(input_ids, image_grid_thw,
    video_grid_thw, attention_mask) -> [3, b, s]` fills the micro-batches' position_ids (the model's 3-D rope).
    """
    if processor is not None and task == "sft":
        return build_media_data(data, processor, global_batch_size, seed, progress, positions_fn)
    seq_length = data.seq_length
    pad_id = pad_token_id(tokenizer)
    max_length = data.max_length or seq_length + 1
    padded = PaddedCollate(seq_length, pad_id)
    eval_collate = PairCollate(seq_length, pad_id) if task in PAIR_TASKS else padded
    if task == KTO_TASK:
        eval_collate = KtoCollate(seq_length, pad_id)
    if task == RM_TASK:  # the reward is read at a sample's last token: whole samples are inputs (preflight)
        max_length, eval_collate = data.max_length or seq_length, RewardPairCollate(seq_length, pad_id)

    def batches(items, collate=padded) -> GlobalBatches:
        return GlobalBatches(items, global_batch_size, seed, data.shuffle, collate)

    if len(data.dataset) == 1 and is_indexed_prefix(data.dataset[0]):
        windows = TokenWindows.from_indexed(data.dataset[0], seq_length, seed, data.shuffle)
        return TrainData(batches(windows), len(windows), stats={"indexed_windows": len(windows)})
    encoder = make_encoder(data, tokenizer, task)
    held_out = {}
    if data.val_dataset:  # a validation set of its own: read whole, also when the training data streams
        val_samples, _ = encode_dataset(dataclasses.replace(data, dataset=data.val_dataset), encoder, seed, False)
        held_out = {"eval_items": validation_items(val_samples, task, data, max_length, seed, global_batch_size),
                    "eval_collate": eval_collate}  # fmt: skip
    if data.streaming:
        stream = StreamingBatches(data.dataset, encoder, max_length, data.truncation_strategy, global_batch_size,
                                  padded, seed, data.shuffle_buffer if data.shuffle else 0,
                                  BadRows(skip=data.skip_bad_rows))  # fmt: skip
        return TrainData(stream, None, stats={"streaming": True}, **held_out)
    samples, stats = encode_dataset(data, encoder, seed, progress)
    if not stats["bad_examples"]:
        del stats["bad_examples"]
    samples, validation = split_rows(samples, data.split_dataset_ratio, seed)
    stats |= {"samples": len(samples), "validation": len(validation)}
    if validation:
        held_out = {"eval_items": validation_items(validation, task, data, max_length, seed, global_batch_size),
                    "eval_collate": eval_collate}  # fmt: skip
    if task == KTO_TASK:  # preflight refuses streaming for KTO
        items = fit_labelled(samples, data, max_length, global_batch_size, stats)
        if not data.packing:
            return TrainData(batches(items, KtoCollate(seq_length, pad_id)), len(items), validation, stats, **held_out)
        # Whole items per row (data/kto.py); one longer than a row (max_length > seq_length + 1) cannot be packed.
        stats["items_longer_than_a_row"] = sum(item_positions(item) > seq_length for item in items)
        items = [item for item in items if item_positions(item) <= seq_length]
        if not items:
            raise DataError(f"no KTO item fits a packed row of {seq_length} positions; raise data.seq_length or "
                            "lower data.max_length")  # fmt: skip
        rows = [[items[i] for i in row] for row in pack([item_positions(item) + 1 for item in items], seq_length)]
        stats["packed_rows"] = len(rows)
        return TrainData(batches(rows, PackedKtoCollate(seq_length, pad_id)), len(rows), validation, stats, **held_out)
    if task in (*PAIR_TASKS, RM_TASK):  # preflight refuses streaming for pairs
        pairs = fit_pairs(samples, max_length, data.truncation_strategy, stats)
        if data.packing:  # whole pairs per row: a pair longer than a row cannot be packed
            stats["pairs_longer_than_a_row"] = sum(pair_positions(pair, task) > seq_length for pair in pairs)
            pairs = [pair for pair in pairs if pair_positions(pair, task) <= seq_length]
        if not pairs:
            raise DataError(f"no preference pair left to train on after truncation to {max_length} tokens"
                            + (f" (packing: both sides of a pair in one row of {seq_length})" if data.packing else "")
                            + "; raise data.seq_length or change data.truncation_strategy")  # fmt: skip
        if not data.packing:
            collate = RewardPairCollate(seq_length, pad_id) if task == RM_TASK else PairCollate(seq_length, pad_id)
            return TrainData(batches(pairs, collate), len(pairs), validation, stats, **held_out)
        rows = [[pairs[i] for i in row] for row in pack([pair_positions(pair, task) + 1 for pair in pairs], seq_length)]
        stats["packed_rows"] = len(rows)
        collate = PackedRewardPairCollate if task == RM_TASK else PackedPairCollate
        return TrainData(batches(rows, collate(seq_length, pad_id)), len(rows), validation, stats, **held_out)
    if task == "pretrain" and not data.packing:
        windows = TokenWindows.from_samples(samples, seq_length, seed, data.shuffle)
        stats["windows"] = len(windows)
        return TrainData(batches(windows), len(windows), validation, stats, **held_out)
    fitted = fit_samples(samples, max_length, data.truncation_strategy, stats)
    lengths = [len(s.ids) for s in fitted]
    stats["padding_fraction_unpacked"] = round(padding_fraction(lengths, len(fitted), seq_length), 4)
    if not data.packing:
        return TrainData(batches(fitted), len(fitted), validation, stats, **held_out)
    rows = [[fitted[i] for i in row] for row in pack(lengths, seq_length)]
    stats |= {"packed_rows": len(rows),
              "padding_fraction_packed": round(padding_fraction(lengths, len(rows), seq_length), 4)}  # fmt: skip
    return TrainData(batches(rows, PackedCollate(seq_length, pad_id)), len(rows), validation, stats, **held_out)


def fit_media(samples: list, data, max_length: int, media_ids: set[int], stats: dict) -> list:
    """Multimodal samples cut like text samples, except that a cut through an image deletes the sample."""
    counts, cut = TruncationCounts(), []
    kept = [fit_media_sample(s, max_length, data.truncation_strategy, counts, media_ids, cut) for s in samples]
    fitted = [sample for sample in kept if sample is not None]
    stats |= {"truncated": counts.truncated, "deleted_too_long": counts.deleted,
              "no_target_after_truncation": counts.no_target, "deleted_image_cut": len(cut),
              "trained_samples": len(fitted)}  # fmt: skip
    if cut:
        stats["image_cut_examples"] = cut[:3]
    if not fitted:
        raise DataError(f"no sample left to train on after truncation to {max_length} tokens"
                        + (f" (e.g. {cut[0]})" if cut else "") + "; raise data.seq_length")  # fmt: skip
    return fitted


def build_media_data(data, processor, global_batch_size: int, seed: int, progress: bool, positions_fn) -> TrainData:
    """SFT on a vision-language model: rows (with or without images) encoded by the processor, padded or packed."""
    if data.streaming:
        raise DataError("data.streaming is not supported for vision-language models yet; set data.streaming=false")
    if data.cache_dir:
        raise DataError("data.cache_dir is not supported for vision-language models yet (images are re-read each "
                        "step); unset it")  # fmt: skip
    if len(data.dataset) == 1 and is_indexed_prefix(data.dataset[0]):
        raise DataError("indexed (.bin/.idx) data has no images; vision-language SFT needs chat rows")
    if data.template not in ("auto", "tokenizer"):
        raise DataError(f"data.template={data.template}: a vision-language model's rows are rendered by its "
                        "processor's chat template; use template auto")  # fmt: skip
    seq_length, pad_id = data.seq_length, pad_token_id(processor.tokenizer)
    max_length = data.max_length or seq_length + 1
    policy = LossPolicy(data.loss_scale, {"tool": 0.0, **parse_role_scales(data.role_loss_scale)})
    options = image_options(processor, data.max_pixels, data.min_pixels)
    encoder = MediaEncoder(processor, policy, data.format, options)
    padded = MediaPaddedCollate(processor, options, seq_length, pad_id, positions_fn)
    held_out = {}
    if data.val_dataset:
        val_samples, _ = encode_dataset(dataclasses.replace(data, dataset=data.val_dataset), encoder, seed, False)
        held_out = {"eval_items": fit_media(val_samples, data, max_length, encoder.media_ids, {}),
                    "eval_collate": padded}  # fmt: skip
    samples, stats = encode_dataset(data, encoder, seed, progress)
    if not stats["bad_examples"]:
        del stats["bad_examples"]
    samples, validation = split_rows(samples, data.split_dataset_ratio, seed)
    stats |= {"samples": len(samples), "validation": len(validation),
              "images": sum(len(s.images) for s in samples)}  # fmt: skip
    if validation:
        held_out = {"eval_items": fit_media(validation, data, max_length, encoder.media_ids, {}),
                    "eval_collate": padded}  # fmt: skip
    fitted = fit_media(samples, data, max_length, encoder.media_ids, stats)

    def batches(items, collate) -> GlobalBatches:
        return GlobalBatches(items, global_batch_size, seed, data.shuffle, collate)

    if not data.packing:
        return TrainData(batches(fitted, padded), len(fitted), validation, stats, **held_out)
    lengths = [len(s.ids) for s in fitted]
    rows = [[fitted[i] for i in row] for row in pack(lengths, seq_length)]
    stats |= {"packed_rows": len(rows),
              "padding_fraction_packed": round(padding_fraction(lengths, len(rows), seq_length), 4)}  # fmt: skip
    collate = MediaPackedCollate(processor, options, seq_length, pad_id, positions_fn)
    return TrainData(batches(rows, collate), len(rows), validation, stats, **held_out)
