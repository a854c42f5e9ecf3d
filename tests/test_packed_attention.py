"""Packed sequences (THD) through the SDPA core attention: no attention across documents.

The HF model run on each document alone is the reference for the packed forward's logits.
"""

import torch

from megatron_swift.models.attention import cp_positions, packed_causal_keep

DOC_LENGTHS = (9, 13, 7)
PAD = 3  # a padding tail is its own final segment


def test_packed_causal_keep_is_block_diagonal_causal():
    keep = packed_causal_keep(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(keep, expected)


def test_cp_positions_are_megatrons_load_balanced_chunks():
    # seq 16, CP 2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_positions(8, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_positions(8, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_packed_logits_equal_each_document_alone_in_hf(tiny_models, llama_world):
    from transformers import AutoModelForCausalLM

    from megatron_swift.models.forward import forward_logits
    from megatron_swift.training.step import packed_seq_params

    chunks, args = llama_world
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(0, args.vocab_size, (n,), generator=generator) for n in (*DOC_LENGTHS, PAD)]
    offsets = torch.tensor([0, *torch.tensor([len(d) for d in documents]).cumsum(0).tolist()], dtype=torch.int32)
    packed = torch.cat(documents).unsqueeze(0)

    packed_logits = forward_logits(chunks, packed, args.vocab_size, packed_seq_params(offsets))[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    for index, document in enumerate(documents[: len(DOC_LENGTHS)]):
        with torch.no_grad():
            alone = hf(document.unsqueeze(0)).logits[0]
        start, end = int(offsets[index]), int(offsets[index + 1])
        diff = (packed_logits[start:end] - alone).abs().max().item()
        assert diff < 1e-5, (index, diff)

    # The same tokens unpacked (one causal sequence) see the earlier documents: the check has teeth.
    unpacked_logits = forward_logits(chunks, packed, args.vocab_size)[0]
    second = slice(int(offsets[1]), int(offsets[2]))
    assert (unpacked_logits[second] - packed_logits[second]).abs().max() > 1e-2
