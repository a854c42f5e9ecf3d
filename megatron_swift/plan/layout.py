"""A job's parallel layout and implementation as numbers: what every memory and time term reads.

`Layout` resolves the sizes megatron-core derives at start-up (data parallel, expert data parallel,
micro-batches per step, each stage's layers as `get_transformer_layer_offset` splits them). `Ops`
says which module implementations the run uses, resolved from the job and the target machine the way
the engine resolves them (models/builder.py, models/kernel_modules.py, training/fusions.py), because
what autograd keeps for backward depends on them (e.g. the torch RMSNorm keeps an fp32 copy of its
input, the Triton one the input itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.training.config import JobConfig


@dataclass(frozen=True)
class Target:
    """The machine a run is planned for: what decides the layer spec, kernels and fusions."""

    cuda: bool = True
    transformer_engine: bool = True  # the `.[gpu]` extra
    triton: bool = True
    apex_fused_wgrad: bool = False  # Apex's fused weight-gradient GEMM (gradient_accumulation_fusion)

    @classmethod
    def this_machine(cls) -> Target:
        import torch

        from megatron_swift.training.fusions import Machine
        from megatron_swift_kernels.select import triton_installed

        machine = Machine.detect()
        cuda = torch.cuda.is_available()
        return cls(cuda, cuda and machine.transformer_engine, cuda and triton_installed(), machine.apex_fused_wgrad)


CPU = Target(cuda=False, transformer_engine=False, triton=False)


@dataclass(frozen=True)
class Ops:
    """What each module keeps for backward depends on which implementation runs (see activations.py)."""

    te_spec: bool
    norm: Literal["torch", "fused"]  # torch: fp32 copy of the input + normalised; fused: the input
    mlp_act: Literal["torch", "fused", "glu"]  # dense SwiGLU: our torch / Triton kernels, megatron's glu
    expert_act: Literal["fused", "glu"]  # experts: megatron's weighted bias_swiglu or glu + probs multiply
    attention: Literal["sdpa", "te", "local"]
    rope_fused: bool
    wgrad_fused: bool  # weight gradients accumulate straight into main_grad (no bf16 temporary)
    loss: Literal["logits", "fused_linear"]
    fused_adam: bool  # TE / Apex FusedAdam keep no per-parameter `step` tensor; torch's Adam does
    alltoall: bool  # MoE token dispatcher

    @classmethod
    def resolve(cls, job: JobConfig, target: Target) -> Ops:
        model = job.model
        te_spec = model.spec == "te" or (model.spec == "auto" and target.cuda and target.transformer_engine)
        kernels = model.kernels if model.kernels != "auto" else ("triton" if target.cuda and target.triton else "torch")
        if te_spec:
            norm, mlp_act = "fused", "fused" if model.bias_activation_fusion is not False else "glu"
        else:
            norm = mlp_act = "torch" if kernels == "torch" else "fused"
        bias_act = model.bias_activation_fusion
        expert_fused = bias_act if bias_act is not None else (target.cuda and te_spec)
        rope = model.apply_rope_fusion
        dispatcher = job.moe.moe_token_dispatcher_type
        return cls(
            te_spec=te_spec,
            norm=norm,
            mlp_act=mlp_act,
            expert_act="fused" if expert_fused else "glu",
            attention="te" if te_spec else model.attention,
            rope_fused=rope if rope is not None else (target.cuda and target.transformer_engine),
            wgrad_fused=bool(model.gradient_accumulation_fusion)
            if model.gradient_accumulation_fusion is not None
            else target.cuda and target.apex_fused_wgrad,
            loss="fused_linear" if model.fused_linear_cross_entropy else "logits",
            fused_adam=target.cuda and target.transformer_engine,
            alltoall=dispatcher == "alltoall" or (dispatcher == "auto" and target.cuda),
        )


@dataclass(frozen=True)
class Chunk:
    """One model chunk of a pipeline rank: its global layers and whether it holds the embedding / output."""

    pp_rank: int
    vp_stage: int
    first_layer: int
    num_layers: int
    pre_process: bool
    post_process: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int  # model chunks per pipeline rank (1 without virtual pipelining)
    cp: int
    ep: int
    etp: int
    sp: bool
    dp: int
    edp: int  # expert data parallel: world / (pp x ep x etp)
    distributed_optimizer: bool
    bucket_size: int | None  # DDP bucket (elements) when gradient reduction overlaps, else one bucket
    micro_batch_size: int
    num_microbatches: int
    seq_length: int
    recompute: Literal["full", "selective"] | None
    recompute_method: Literal["uniform", "block"] | None
    recompute_num_layers: int
    dtype_bytes: int  # parameters and activations: 2 for bf16 / fp16, 4 for fp32
    lora: bool
    chunks: tuple[Chunk, ...]

    @classmethod
    def from_job(cls, job: JobConfig, world: int, args: GPTModelArgs) -> Layout:
        """Call on a job preflight accepts (the sizes divide)."""
        p, t = job.parallel, job.train
        tp, pp, cp, ep = (
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.context_parallel_size,
            p.expert_model_parallel_size,
        )
        etp = p.expert_tensor_parallel_size or tp
        dp = world // (tp * pp * cp)
        bucket = None
        if t.overlap_grad_reduce:  # megatron-core's default bucket size (its DP group without CP)
            bucket = t.ddp_bucket_size or max(40_000_000, 1_000_000 * dp)
        full = t.recompute_granularity == "full"
        return cls(
            world=world,
            tp=tp,
            pp=pp,
            vpp=p.virtual_pipeline_model_parallel_size or 1,
            cp=cp,
            ep=ep,
            etp=etp,
            sp=p.sequence_parallel and tp > 1,
            dp=dp,
            edp=world // (pp * ep * etp),
            distributed_optimizer=t.use_distributed_optimizer,
            bucket_size=bucket,
            micro_batch_size=t.micro_batch_size,
            num_microbatches=max(1, t.global_batch_size // (t.micro_batch_size * dp)),
            seq_length=job.data.seq_length,
            recompute=t.recompute_granularity,
            recompute_method=t.recompute_method if full else None,
            recompute_num_layers=(t.recompute_num_layers or 1) if full else 0,
            dtype_bytes=2 if (t.bf16 or t.fp16) else 4,
            lora=t.train_type == "lora",
            chunks=tuple(split_layers(args.transformer["num_layers"], p, pp)),
        )

    @property
    def mixed_precision(self) -> bool:
        return self.dtype_bytes == 2

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank's sequence slice (packing keeps mbs x seq per row)."""
        return self.micro_batch_size * self.seq_length // self.cp

    @property
    def sp_tokens(self) -> int:
        """Tokens of one micro-batch in the sequence-parallel regions (norms, residual stream)."""
        return self.tokens // self.tp if self.sp else self.tokens

    def stage_chunks(self, pp_rank: int) -> list[Chunk]:
        return [chunk for chunk in self.chunks if chunk.pp_rank == pp_rank]


def split_layers(num_layers: int, parallel, pp: int) -> list[Chunk]:
    """Every (pipeline rank, virtual stage) chunk with its global layers, as megatron-core's
    `get_transformer_layer_offset` places them: chunk-major (all ranks' chunk 0 first), the first / last
    stage holding `decoder_first/last_pipeline_num_layers` when set and the others the rest evenly."""
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    first, last = parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    per_stage = [0] * pp
    middle = [r for r in range(pp) if not (r == 0 and first is not None) and not (r == pp - 1 and last is not None)]
    rest = num_layers - (first or 0) - (last or 0)
    for r in middle:
        per_stage[r] = rest // len(middle)
    if first is not None:
        per_stage[0] = first
    if last is not None:
        per_stage[-1] = last
    chunks, offset = [], 0
    for vp_stage in range(vpp):
        for r in range(pp):
            count = per_stage[r] // vpp
            chunks.append(
                Chunk(r, vp_stage, offset, count, r == 0 and vp_stage == 0, r == pp - 1 and vp_stage == vpp - 1)
            )
            offset += count
    return sorted(chunks, key=lambda c: (c.pp_rank, c.vp_stage))
