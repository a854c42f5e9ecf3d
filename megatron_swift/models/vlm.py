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

What a family's `VisionTower` adds:
- `interleaved_mrope`: GPTModel's multimodal rotary module is replaced by models/interleaved_mrope.py's (Qwen3-VL's
  channel layout); megatron-core applies it as any rope.
- `deepstack_field` (Qwen3-VL's DeepStack): the tower also returns features of some of its blocks (each through its
  own merger); level i is added to the hidden states at the image / video tokens after decoder layer i (0-based,
  i < levels), as HF's `_deepstack_process`. The first-stage embed lays each level out as a [s, b, h] tensor, zero
  off the visual tokens (so the add leaves text tokens bitwise unchanged), scattered over the sequence-parallel
  ranks as the embeddings are; forward hooks on those decoder layers add it. The layers must all be on the first
  stage, with the tower (models/layout.py refuses other pipeline splits). The levels are held from the embed to the
  hooks on the model: a full-recompute backward re-runs the hooks with the latest micro-batch's levels, so
  training refuses full recompute with pipeline parallelism for such a tower (micro-batches then interleave).
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
        self.vision_spec = vision  # the family's VisionTower: what training freezes and rates per part
        if self.pre_process:
            setattr(self, vision.module_name, vision.build(vision_config, self.config.params_dtype))
        if vision.interleaved_mrope and self.position_embedding_type == "mrope":
            from megatron_swift.models.interleaved_mrope import (
                InterleavedMultimodalRotaryEmbedding,
                interleaved_sections_problem,
            )

            problem = interleaved_sections_problem(self.mrope_section)
            if problem:
                raise ValueError(problem)
            self.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding(self.rotary_pos_emb)
        # DeepStack levels of the current forward ([s, b, h] each, this rank's sequence shard), or None.
        self._deepstack: list[torch.Tensor] | None = None
        levels = len(vision_config[vision.deepstack_field]) if vision.deepstack_field else 0
        if levels and self.pre_process:
            hooked = [layer for layer in self.decoder.layers if layer.layer_number <= levels]
            if len(hooked) != levels:
                raise ValueError(
                    f"{vision.config_field}.{vision.deepstack_field} adds features after the first {levels} decoder "
                    f"layers, but this first pipeline stage holds {len(hooked)} of them"
                )
            for layer in hooked:
                layer.register_forward_hook(self._deepstack_hook(layer.layer_number - 1))

    @property
    def vision_tower(self):
        return getattr(self, self.vision_spec.module_name)

    def _deepstack_hook(self, level: int):
        """Forward hook of decoder layer `level` (0-based): its output hidden states plus the level's features."""

        def add_level(module, args, output):
            if self._deepstack is None:
                return output
            hidden, context = output
            return hidden + self._deepstack[level].to(hidden.dtype), context

        return add_level

    def _features(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None, kind: str):
        """(merged features [n, h], DeepStack levels' features [n, h] each) of images or videos."""
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values were given without their {kind}_grid_thw")
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        output = tower(pixels.to(dtype), grid_thw=grid_thw)
        return output.pooler_output, list(getattr(output, "deepstack_features", None) or [])

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
        deepstack = None  # per level: zeros but at the visual tokens (images' and videos' features both)
        for pixels, grid_thw, token_id, kind in (
            (pixel_values, image_grid_thw, self.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.video_token_id, "video"),
        ):
            if pixels is None:
                continue
            features, levels = self._features(pixels, grid_thw, kind)
            embeddings = self._merge(embeddings, input_ids, features, token_id, kind)
            if levels:
                deepstack = deepstack or [torch.zeros_like(embeddings) for _ in levels]
                placed = zip(deepstack, levels, strict=True)
                deepstack = [self._merge(level, input_ids, f, token_id, kind) for level, f in placed]
        if pixel_values is None and pixel_values_videos is None and torch.is_grad_enabled():
            # A micro-batch without images leaves a trained tower without gradients, and megatron-core's DDP waits
            # for every trainable parameter's (with overlap_grad_reduce a bucket is launched only when all its
            # parameters have reported). Adding 0 x the tower's parameters gives them zero gradients; exact.
            trained = [param for param in self.vision_tower.parameters() if param.requires_grad]
            if trained:
                embeddings = embeddings + 0.0 * sum(param.sum() for param in trained).to(embeddings.dtype)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            if deepstack is not None:
                deepstack = [tensor_parallel.scatter_to_sequence_parallel_region(d) for d in deepstack]
        self._deepstack = deepstack
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
