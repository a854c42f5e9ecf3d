"""Forward-only passes through megatron-core's pipeline schedules, returning full-vocab logits.

Used by checkpoint checks and evaluation: works for any TP/PP/VPP layout because it goes through
`get_forward_backward_func` like training does. Logits come back on the last pipeline stage
(gathered over TP, padding rows of the vocabulary dropped); other stages get None.
"""

from __future__ import annotations

from functools import partial

import torch


def _forward_step(data_iterator, model, vocab_size: int, packed_seq_params=None):
    from megatron.core import tensor_parallel

    tokens = next(data_iterator).to(next(model.parameters()).device)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, packed_seq_params=packed_seq_params)

    def collect(output_tensor, non_loss_data=False):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor)
        return full[..., :vocab_size].detach().float().cpu()

    return output, collect


@torch.no_grad()
def forward_logits(chunks, tokens: torch.Tensor, vocab_size: int, packed_seq_params=None) -> torch.Tensor | None:
    """Logits [batch, seq, vocab_size] (fp32, on CPU) on the last pipeline stage, None elsewhere.

    With megatron-core `PackedSeqParams` (THD), `tokens` is one [1, total] row of packed documents.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    batch, seq = tokens.shape
    data = iter([tokens])
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, vocab_size=vocab_size, packed_seq_params=packed_seq_params),
        data_iterator=[data] * len(chunks) if len(chunks) > 1 else data,
        model=chunks,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return outputs[0]
