"""Reward models (train.task rm): megatron-core's GPTModel with HF's sequence-classification head.

HF's `*ForSequenceClassification` (transformers' GenericForSequenceClassification) applies `score`, a linear from the
hidden size to `num_labels` without bias, to the final (normed) hidden states and keeps the logits of each row's last
non-pad token: the rightmost position whose token is not `config.pad_token_id` (`last_non_pad_positions`). Here
`num_labels` is 1: a scalar reward.

`RewardGPTModel` is that model. Its last pipeline stage has `score` instead of the output layer and returns the
per-token scores [b, s]; the training code picks each row's position, computed from the tokens with the data. The
head is one [1, hidden] weight replicated over the tensor-parallel ranks: every rank holds the same values and, as
every rank computes the same loss from the same scores, gets the same gradient (no reduction; counted once in the
grad norm, as megatron-core counts replicated parameters). With sequence parallelism the final hidden states are
gathered over the sequence before the head (their gradient split back to each rank's part), so every rank scores
the whole sequence.

The HF names: the head is `score.weight` in both models (`REWARD_HEAD`, added to any family's rules by
`GPTModelArgs.mapping`), and the HF architecture is the family's `reward_architecture`.
"""

from __future__ import annotations

import torch

from megatron_swift.models.gpt import GPTModel
from megatron_swift.models.mapping import Rename

REWARD_HEAD_MODULE = "score"
REWARD_HEAD = Rename(f"{REWARD_HEAD_MODULE}.weight", hf_name=f"{REWARD_HEAD_MODULE}.weight")


def last_non_pad_positions(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row of `tokens` [b, s], HF's position of the reward: the rightmost token that is not `pad_id` (0 for a
    row of padding only), exactly as GenericForSequenceClassification.forward computes it."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return (positions * (tokens != pad_id)).argmax(-1)


class RewardGPTModel(GPTModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.post_process:
            return
        # megatron-core built the vocabulary projection; a reward model has none (HF's has no lm_head either).
        del self.output_layer
        config = self.config
        # Where megatron-core puts its parameters: the GPU unless use_cpu_initialization (then the ambient device:
        # CPU, or meta when the exporter builds the model).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.score = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=config.params_dtype, device=device)
        if config.perform_initialization:  # HF's normal(0, initializer_range); training sets it from train.seed
            config.init_method(self.score.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core's default over the submodules (`score` is stored replicated over TP); LanguageModule's
        adds the output layer's tying and padding, and a reward model has no output layer."""
        from megatron.core.transformer.module import MegatronModule

        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def _postprocess(self, hidden_states, **kwargs):
        """Per-token scores [b, s] of the final hidden states [s(/tp), b, h]."""
        from megatron.core import tensor_parallel

        if not self.post_process:  # an earlier pipeline stage: its hidden states go to the next one
            return hidden_states
        if kwargs.get("labels") is not None:
            raise ValueError("a reward model has no language-model loss; call it without labels")
        if self.config.sequence_parallel:
            # Every TP rank scores the whole sequence; each rank's loss is the same, so each rank's part of the
            # gradient is its own slice of it (split, not reduce-scattered).
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )
        return self.score(hidden_states).squeeze(-1).transpose(0, 1).contiguous()


def initialise_reward_head(chunks, std: float, seed: int) -> None:
    """A new head (a reward model started from a causal LM): normal(0, std) as HF initialises `score`, drawn from
    `seed` alone, so every rank and every parallel layout holds the same values."""
    from megatron_swift.models.naming import unwrap_model

    for chunk in chunks:
        model = unwrap_model(chunk)
        if getattr(model, "score", None) is None:
            continue  # not the last pipeline stage
        weight = model.score.weight
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        with torch.no_grad():
            weight.copy_(drawn.to(weight.dtype))


def reward_model_config(config: dict, architecture: str, pad_token_id: int | None) -> dict:
    """An HF causal-LM (or reward-model) config.json as the reward model's: `architecture` (the family's
    `*ForSequenceClassification`), one label, and the pad token HF finds the reward position with."""
    config = {**config, "architectures": [architecture], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    config.pop("num_labels", None)  # transformers derives it from id2label
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    return config
