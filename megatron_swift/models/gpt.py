"""The GPT model every chunk is built as: megatron-core's GPTModel, with its training loss taken over the
real vocabulary.

Megatron pads the vocabulary (`make_vocab_size_divisible_by`, tensor parallelism); the HF model has no
such columns. Training asks megatron-core for the per-token loss (`labels=` in the forward), which it
computes from sequence-first logits (no [s, b, v] -> [b, s, v] copy forwards or backwards) and, when
configured, with its fused cross entropy. Left alone, that softmax would also run over the padding
columns' logits; `compute_language_model_loss` sets them to -inf first, so the loss is the HF model's
loss exactly. Gemma scales the embeddings by sqrt(hidden_size) (`embedding_multiplier`), which megatron-core's
embedding does not offer. Parameters and state-dict keys are megatron-core's.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel as MegatronGPTModel


def mask_vocab_padding(logits: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """This TP rank's vocab-parallel logits [..., v/tp] with the padding columns (ids >= real_vocab_size) at -inf."""
    from megatron.core import parallel_state as ps

    local_vocab = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * local_vocab
    if first + local_vocab <= real_vocab_size:
        return logits
    padding = torch.arange(first, first + local_vocab, device=logits.device) >= real_vocab_size
    return logits.masked_fill(padding, float("-inf"))


class GPTModel(MegatronGPTModel):
    def __init__(self, *args, real_vocab_size: int, embedding_multiplier: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.embedding_multiplier = embedding_multiplier
        if embedding_multiplier is not None and self.pre_process:
            self.embedding.register_forward_hook(self._scale_embeddings)

    def _scale_embeddings(self, _module, _inputs, embeddings: torch.Tensor) -> torch.Tensor:
        # As HF Gemma: the multiplier rounded to the embeddings' dtype (sqrt(3072) is 55.5 in bf16). Elementwise,
        # so it commutes with the sequence-parallel scatter and the dropout megatron applies inside the module.
        return embeddings * torch.tensor(self.embedding_multiplier, dtype=torch.float32).to(embeddings.dtype)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] from this rank's vocab-parallel logits [s, b, v/tp]."""
        return super().compute_language_model_loss(labels, mask_vocab_padding(logits, self.real_vocab_size))
