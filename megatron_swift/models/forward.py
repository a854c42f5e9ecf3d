"""Forward-only passes through megatron-core's pipeline schedules, returning full-vocab logits.

Used by checkpoint checks and evaluation: works for any TP/PP/VPP layout because it goes through
`get_forward_backward_func` like training does. Logits come back on the last pipeline stage
(gathered over TP, padding rows of the vocabulary dropped); other stages get None.

A model with multimodal rope (position_embedding_type "mrope") takes positions [3, b, s]: given (e.g. from
models/rope_index.py for rows with images), or 0..s-1 on all three axes (text only). A vision-language model
(models/vlm.py) also takes its image / video inputs (`pixel_values`, `image_grid_thw`, ...), used by the first stage.
"""

from __future__ import annotations

from functools import partial

import torch


def _forward_step(data_iterator, model, vocab_size: int, packed_seq_params=None, position_ids=None, inputs=None):
    from megatron.core import tensor_parallel

    from megatron_swift.models.naming import unwrap_model

    tokens = next(data_iterator).to(next(model.parameters()).device)
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        if unwrap_model(model).position_embedding_type == "mrope":  # text only: the same position on every axis
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    device = tokens.device
    extra = {name: value.to(device) for name, value in (inputs or {}).items() if value is not None}
    output = model(tokens, position_ids.to(device), None, packed_seq_params=packed_seq_params, **extra)

    def collect(output_tensor, non_loss_data=False):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor)
        return full[..., :vocab_size].detach().float().cpu()

    return output, collect


@torch.no_grad()
def forward_logits(
    chunks,
    tokens: torch.Tensor,
    vocab_size: int,
    packed_seq_params=None,
    position_ids: torch.Tensor | None = None,
    inputs: dict | None = None,
) -> torch.Tensor | None:
    """Logits [batch, seq, vocab_size] (fp32, on CPU) on the last pipeline stage, None elsewhere.

    With megatron-core `PackedSeqParams` (THD), `tokens` is one [1, total] row of packed documents. `position_ids`:
    [b, s], or [3, b, s] with multimodal rope; None: 0..s-1. `inputs`: a vision-language model's image / video
    keyword arguments.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    batch, seq = tokens.shape
    data = iter([tokens])
    outputs = get_forward_backward_func()(
        forward_step_func=partial(
            _forward_step,
            vocab_size=vocab_size,
            packed_seq_params=packed_seq_params,
            position_ids=position_ids,
            inputs=inputs,
        ),
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
