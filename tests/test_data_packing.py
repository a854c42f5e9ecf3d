"""Packing (THD): rows of whole documents with cu_seqlens, and the same per-document loss as unpacked batches."""

import pytest
import torch

from megatron_swift.data import build_train_data
from megatron_swift.data.packing import PaddedCollate, pack
from megatron_swift.models.tiny import make_tiny_tokenizer
from megatron_swift.training.config import DataSection
from tests.train_matrix import job_for

SFT = "examples/data/sft_sample.jsonl"
SEQ = 96


def _packed(tokenizer):
    data = DataSection(dataset=[SFT], seq_length=SEQ, packing=True, shuffle=False)
    return build_train_data(data, tokenizer, "sft", 4, 0)


def _last_two_rows(data):
    """A micro-batch of the last two packed rows (best-fit puts the short documents there), and their documents."""
    rows = data.batches.items
    data.batches.consumed_samples = len(rows) - 2
    return data.batches.next_microbatches(0, 1, 2)[0], [doc for row in rows[-2:] for doc in row]


def test_best_fit_rows_hold_every_sample_once_within_capacity():
    lengths = [30, 70, 10, 97, 50, 45, 5, 20]
    rows = pack(lengths, 96)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] - 1 for i in row) <= 96 for row in rows)
    assert len(rows) == 4  # sum of positions 319 -> at least 4 rows of 96
    with pytest.raises(ValueError, match="more than seq_length"):
        pack([98], 96)


def test_packed_micro_batch_layout():
    tokenizer = make_tiny_tokenizer()
    data = _packed(tokenizer)
    assert data.stats["padding_fraction_packed"] < data.stats["padding_fraction_unpacked"]
    rows = data.batches.items
    assert sorted(len(s.ids) for row in rows for s in row) == sorted(
        len(s.ids)
        for s in build_train_data(DataSection(dataset=[SFT], seq_length=SEQ), tokenizer, "sft", 4, 0).batches.items
    )  # every sample, once
    batch, documents = _last_two_rows(data)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 2 * SEQ and (cu[1:] > cu[:-1]).all()
    assert set((r + 1) * SEQ for r in range(2)) <= set(cu.tolist())  # rows end on a segment boundary
    flat = {key: batch[key].reshape(-1) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    segments = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    real = [seg for seg in segments if flat["position_ids"][seg[0]] == 0 and flat["loss_mask"][seg[0] : seg[1]].any()]
    assert len(real) == len(documents)
    for (start, end), doc in zip(real, documents, strict=True):
        assert flat["position_ids"][start:end].tolist() == list(range(end - start))
        assert flat["tokens"][start:end].tolist() == doc.ids[:-1].tolist()
        assert flat["labels"][start:end].tolist() == doc.ids[1:].tolist()
        assert flat["loss_mask"][start:end].tolist() == doc.weights[1:].tolist()
    for start, end in set(segments) - set(real):  # the padding tail of a row: its own segment, never trained
        assert not flat["loss_mask"][start:end].any()


def test_training_step_on_packed_rows_has_the_unpacked_loss(tiny_models, tmp_path):
    """Through the launcher and train step: a global batch of every document, packed or not, has the same loss."""
    from megatron_swift.training.job import train

    losses = {}
    for packing in (False, True):
        job = job_for(str(tiny_models["llama"]), SFT, str(tmp_path / str(packing)), {}, {"train_iters": 1})
        job.data = DataSection(dataset=[SFT], seq_length=SEQ, packing=packing, shuffle=False)
        job.train.global_batch_size = 16 if packing else 20  # every packed row / every sample: all 20 documents
        job.logging.tensorboard = False
        (losses[packing],) = train(job)
    assert losses[True].tokens == losses[False].tokens
    assert abs(losses[True].loss - losses[False].loss) / losses[False].loss < 1e-5, losses


def _document_losses(logits, labels, loss_mask, bounds) -> list[float]:
    per_token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return [float((per_token[a:b] * loss_mask[a:b]).sum() / loss_mask[a:b].sum()) for a, b in bounds]


def test_packed_batch_gives_each_documents_unpacked_loss(llama_world):
    from megatron_swift.models.forward import forward_logits
    from megatron_swift.training.step import packed_seq_params

    chunks, args = llama_world
    tokenizer = make_tiny_tokenizer()
    data = _packed(tokenizer)
    batch, documents = _last_two_rows(data)
    cu = batch["cu_seqlens"]
    bounds = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
              if batch["loss_mask"].reshape(-1)[a:b].any()]  # fmt: skip
    assert len(bounds) == len(documents) >= 3
    flat = {key: batch[key].reshape(1, -1) for key in ("tokens", "labels", "loss_mask")}
    logits = forward_logits(chunks, flat["tokens"], args.vocab_size, packed_seq_params(cu))[0]
    packed = _document_losses(logits, flat["labels"][0], flat["loss_mask"][0], bounds)

    unpacked_batch = PaddedCollate(SEQ, tokenizer.pad_token_id)(documents)  # one document per row
    unpacked = []
    for row in range(len(documents)):
        row_logits = forward_logits(chunks, unpacked_batch["tokens"][row : row + 1], args.vocab_size)[0]
        unpacked += _document_losses(row_logits, unpacked_batch["labels"][row], unpacked_batch["loss_mask"][row],
                                     [(0, SEQ)])  # fmt: skip
    assert max(abs(p - u) for p, u in zip(packed, unpacked, strict=True)) < 1e-5, (packed, unpacked)

    # Without the document boundaries the later documents attend to earlier ones: the check has teeth.
    leaky = forward_logits(chunks, flat["tokens"], args.vocab_size)[0]
    leaked = _document_losses(leaky, flat["labels"][0], flat["loss_mask"][0], bounds)
    assert max(abs(p - u) for p, u in zip(leaked[1:], unpacked[1:], strict=True)) > 1e-3


def test_preflight_refuses_packing_with_context_parallelism():
    from megatron_swift.config import ParallelConfig
    from megatron_swift.training.config import TrainSection, data_problems

    problems = data_problems(
        DataSection(dataset=[SFT], packing=True), TrainSection(), ParallelConfig(context_parallel_size=2)
    )
    assert any(p.startswith("data.packing: packed rows are not split over context-parallel ranks") for p in problems)
