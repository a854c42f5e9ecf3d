"""The vision-language model: our GPTModel (megatron-core's, every name and behaviour kept: tied embeddings,
`set_input_tensor`, pipeline stages, the loss over the real vocabulary) with an HF vision tower in front.

What is sharded:
- the language model as any GPTModel: tensor parallel (heads, MLP, vocabulary), pipeline stages, sequence parallel
  activations, data parallel;
- the vision tower (HF's own module, built from the config's vision sub-config by the family's `VisionTower`, e.g.
  transformers' `Qwen2_5_VisionTransformerPretrainedModel`: patch embedding, window-attention blocks, patch merger)
  is replicated over tensor parallelism and lives on the first pipeline stage only (`pre_process`). Every TP rank
  gets the same pixels, computes the same features and, since the embeddings' gradient reaching it is the same on
  every TP rank (the first layer's column-parallel input, or the sequence-parallel scatter's all-gather, reduces
  it), the same gradients: its parameters need no TP reduction, and megatron-core's checkpointing stores them
  once (replica ids over TP). Context parallelism is refused with a tower (models/layout.py): the placeholder
  scatter below needs the whole sequence.

Forward on the first stage: the word embeddings of the whole sequence (never sequence-parallel scattered by the
embedding: it is built with `scatter_embedding_sequence_parallel=False`), the image / video features written over
the placeholder tokens' embeddings in batch-major order (HF's `masked_scatter`), then the sequence-parallel
scatter, then the decoder through GPTModel's `decoder_input`. Positions are the multimodal rope's [3, b, s]
(models/rope_index.py); later stages ignore the pixels.
"""

from __future__ import annotations

import torch

from megatron_swift.models.gpt import GPTModel


class VisionLanguageModel(GPTModel):
    def __init__(
        self,
        *args,
        vision,
        vision_config: dict,
        image_token_id: int | None,
        video_token_id: int | None,
        **kwargs,
    ):
        super().__init__(*args, scatter_embedding_sequence_parallel=False, **kwargs)
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_module_name = vision.module_name
        self.vision_spec = vision  # the family's VisionTower: what training freezes and rates per part
        if self.pre_process:
            setattr(self, vision.module_name, vision.build(vision_config, self.config.params_dtype))

    @property
    def vision_tower(self):
        return getattr(self, self.vision_module_name)

    def _features(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None, kind: str) -> torch.Tensor:
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values were given without their {kind}_grid_thw")
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        return tower(pixels.to(dtype), grid_thw=grid_thw).pooler_output

    def _merge(self, embeddings: torch.Tensor, input_ids: torch.Tensor, features, token_id, kind: str):
        """embeddings [s, b, h] with the rows of `features` [n, h] written at the n placeholder tokens, b-major."""
        if token_id is None:
            raise ValueError(f"the model's config names no {kind} token id, so {kind} inputs cannot be placed")
        mask = input_ids == token_id  # [b, s]
        count = int(mask.sum())
        if count != features.shape[0]:
            raise ValueError(
                f"input_ids hold {count} {kind} tokens (id {token_id}) but the {kind}s give {features.shape[0]} "
                f"features (grid_thw t * h * w / spatial_merge_size**2 each): each {kind} needs exactly that many "
                "placeholder tokens"
            )
        batch_major = embeddings.transpose(0, 1)
        merged = batch_major.masked_scatter(mask.unsqueeze(-1), features.to(batch_major.dtype))
        return merged.transpose(0, 1)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder input [s, b, h] (sequence-parallel scattered when on) of the first stage."""
        from megatron.core import tensor_parallel

        embeddings = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h], whole sequence
        if pixel_values is not None:
            features = self._features(pixel_values, image_grid_thw, "image")
            embeddings = self._merge(embeddings, input_ids, features, self.image_token_id, "image")
        if pixel_values_videos is not None:
            features = self._features(pixel_values_videos, video_grid_thw, "video")
            embeddings = self._merge(embeddings, input_ids, features, self.video_token_id, "video")
        if pixel_values is None and pixel_values_videos is None and torch.is_grad_enabled():
            # A micro-batch without images leaves a trained tower without gradients, and megatron-core's DDP waits
            # for every trainable parameter's (with overlap_grad_reduce a bucket is launched only when all its
            # parameters have reported). Adding 0 x the tower's parameters gives them zero gradients; exact.
            trained = [param for param in self.vision_tower.parameters() if param.requires_grad]
            if trained:
                embeddings = embeddings + 0.0 * sum(param.sum() for param in trained).to(embeddings.dtype)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params=None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        **kwargs,
    ):
        """GPTModel's forward; on the first stage the decoder input is `embed`'s (text + image / video features).
        `position_ids` are the multimodal rope's [3, b, s]."""
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )
