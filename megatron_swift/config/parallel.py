"""ParallelConfig: how one model replica is split over ranks (megatron-core field names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool = False
    # Uneven pipeline split (Megatron-LM's --decoder-first/last-pipeline-num-layers): layers on the first /
    # last stage; the other stages share the rest evenly.
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the dense part (TP x PP x CP)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def problems(self, world_size: int | None = None) -> list[str]:
        """Every inconsistency found (empty when valid). Pure: no I/O, no distributed state."""
        found = []
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                found.append(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                found.append(f"parallel.virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
            elif vpp > 1 and self.pipeline_model_parallel_size < 2:
                found.append(
                    "parallel.virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size >= 2"
                )
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if layers < 1:
                found.append(f"parallel.{name} must be >= 1, got {layers}")
            elif self.pipeline_model_parallel_size < 2:
                found.append(f"parallel.{name} needs pipeline_model_parallel_size >= 2")
            elif vpp and layers % vpp:
                found.append(f"parallel.{name}={layers} is not divisible by virtual_pipeline_model_parallel_size {vpp}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            found.append("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp < 1:
            found.append(f"parallel.expert_tensor_parallel_size must be >= 1, got {etp}")
        if world_size is not None and not found:
            if world_size % self.model_parallel_size:
                found.append(
                    f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
                    f"= {self.model_parallel_size} (parallel.tensor_model_parallel_size, "
                    "parallel.pipeline_model_parallel_size, parallel.context_parallel_size)"
                )
            else:
                expert_dp = world_size // self.pipeline_model_parallel_size
                expert_group = self.expert_model_parallel_size * (etp or self.tensor_model_parallel_size)
                if expert_dp % expert_group:
                    found.append(
                        f"parallel.expert_model_parallel_size={self.expert_model_parallel_size} x expert tensor "
                        f"parallel {etp or self.tensor_model_parallel_size} must divide world size / pipeline "
                        f"parallel = {expert_dp}"
                    )
        return found
