"""Training job configuration: typed sections with megatron-core / Megatron-LM field names, and preflight.

`preflight` validates a whole job against the world size and the model before any process group
exists, and returns every problem found (each naming its field), so a broken launch fails in
seconds instead of hanging in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_swift.config import ParallelConfig
from megatron_swift.data.kto import KTO_TASK
from megatron_swift.data.pairs import PAIR_TASKS, RM_TASK
from megatron_swift.models.layout import model_layout_problems
from megatron_swift.training import vision_tuning
from megatron_swift.training.moe import MoeSection, moe_overrides, moe_problems
from megatron_swift.training.rlhf_config import RlhfSection, rlhf_problems
from megatron_swift.tuners.lora.config import LoraConfig

# lora.target_modules entries that adapt an MoE model's routed experts (PEFT maps gate/up/down_proj onto them).
DORA_EXPERT_REACHING = ("all-linear", "linear_fc1", "linear_fc2", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSection:
    hf: str | None = None  # HF directory: weights loaded straight into the sharded model
    load: str | None = None  # or a megatron-swift checkpoint (from hf-to-mcore or training)
    spec: Literal["auto", "local", "te"] = "auto"
    attention: Literal["sdpa", "local"] = "sdpa"  # core attention of the local spec
    # Our kernels (kernels/) for the local spec's norms and SwiGLU and for the fused loss: auto = triton on a
    # CUDA GPU with Triton installed, else torch; te = the TE spec's own fused modules.
    kernels: Literal["auto", "torch", "triton", "te"] = "auto"
    # Loss from hidden states chunk by chunk, never materialising [tokens, vocab] logits (kernels choose how).
    fused_linear_cross_entropy: bool = False
    make_vocab_size_divisible_by: int = 128
    # Dropout while training (null: the HF config's attention_dropout; no hidden dropout, as HF's decoders).
    attention_dropout: float | None = None
    hidden_dropout: float | None = None  # after attention and after the MLP, before each residual add
    # megatron-core fusions (training/fusions.py): null = on when this machine has what each needs
    apply_rope_fusion: bool | None = None
    bias_dropout_fusion: bool | None = None
    bias_activation_fusion: bool | None = None
    gradient_accumulation_fusion: bool | None = None
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"


@dataclass
class DataSection:
    """Field names follow ms-swift where it has one (see megatron_swift/data/ and the README's data section)."""

    # files or datasets dirs (`path#N`: N rows of it), or the prefix of indexed data (.bin/.idx)
    dataset: list[str] = field(default_factory=list)
    format: Literal["auto", "messages", "sharegpt", "alpaca", "query_response", "text"] = "auto"
    # auto: the tokenizer's chat_template when it has one, else chatml
    template: Literal[
        "auto", "tokenizer", "chatml", "qwen", "agent", "llama3", "llama3_1", "mistral", "mistral_nemo", "plain"
    ] = "auto"
    seq_length: int = 512
    max_length: int | None = None  # tokens per sample (default and maximum: seq_length + 1)
    truncation_strategy: Literal["delete", "left", "right"] = "right"
    loss_scale: Literal["default", "last_round", "all"] = "default"
    role_loss_scale: list[str] = field(default_factory=list)  # role=scale multipliers; tool=0 unless given here
    packing: bool = False  # several samples per row, attention kept within each (THD, cu_seqlens)
    streaming: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 10000  # streaming only
    split_dataset_ratio: float = 0.0  # held out for validation
    val_dataset: list[str] = field(default_factory=list)  # or validation files of their own (same format)
    dataset_num_proc: int = 1  # tokenization worker processes
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping at the first
    cache_dir: str | None = None  # tokenized samples cached here, keyed by (files, tokenizer, template, options)
    # Images (vision-language models): each image is resized to at most max_pixels / at least min_pixels pixels
    # (ms-swift's names; null: the model's preprocessor_config). Set here only: the MAX_PIXELS / MIN_PIXELS
    # environment variables ms-swift also reads are not consulted.
    max_pixels: int | None = None
    min_pixels: int | None = None


@dataclass
class TrainSection:
    # dpo / simpo / orpo: preference pairs, options in the `rlhf` section (training/preference.py); kto: labelled
    # unpaired completions (training/kto.py); rm: a reward model on pairs (training/reward.py)
    task: Literal["pretrain", "sft", "dpo", "simpo", "orpo", "kto", "rm"] = "sft"
    train_type: Literal["full", "lora"] = "full"  # lora: adapters from the `lora` section, base frozen
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    epochs: float | None = None  # when set, train_iters = ceil(epochs x samples / global_batch_size)
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    lr_decay_iters: int | None = None  # decay over this many iterations (null: train_iters), min_lr after
    # WSD (warmup-stable-decay): lr stays at `lr` until the last lr_wsd_decay_iters of the decay, then anneals.
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"
    lr_wsd_decay_iters: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False
    fp8_format: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] | None = None
    use_distributed_optimizer: bool = False
    # Data-parallel communication overlapped with compute (megatron-core DDP): gradient reduction bucket by
    # bucket during the backward, parameter all-gather (distributed optimizer) during the next forward.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None  # elements per bucket (megatron default: max(4e7, 1e6 x DP))
    # Validation loss (data.split_dataset_ratio or data.val_dataset): every eval_interval steps and at the end,
    # over at most eval_iters global batches of it (null: all of it).
    eval_interval: int | None = None
    eval_iters: int | None = None
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    # Vision-language models (ms-swift's names and defaults, training/vision_tuning.py): which parts train, and the
    # vision tower's (ViT) and aligner's own learning rates (null: train.lr).
    freeze_vit: bool = True
    freeze_aligner: bool = True
    freeze_llm: bool = False
    vit_lr: float | None = None
    aligner_lr: float | None = None


@dataclass
class CheckpointSection:
    output_dir: str = "outputs/run"
    save: str | None = None  # checkpoints directory; no checkpoints are written without it
    save_interval: int | None = None  # also saved at the end and on SIGTERM/SIGUSR1
    save_total_limit: int | None = None
    load: str | None = None  # resume from this checkpoints dir (default: `save`, when it has a `latest`)
    no_save_optim: bool = False  # model weights only: smaller, exportable, loadable with model.load, not resumable
    # How the distributed optimizer's state is written: fully_reshardable resumes at any TP/PP/EP/DP (each DP
    # group's state is gathered on one rank to be written); dp_reshardable (every rank writes its own shard:
    # faster saves at large DP) resumes at another DP size only. Either loads whatever the setting.
    optimizer_layout: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"


@dataclass
class LoggingSection:
    tensorboard: bool = True  # OUTPUT_DIR/logs/tensorboard
    wandb_project: str | None = None  # needs `pip install wandb`


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoeSection = field(default_factory=MoeSection)
    rlhf: RlhfSection = field(default_factory=RlhfSection)  # train.task dpo / simpo / orpo / kto / rm only


def preflight(job: JobConfig, world_size: int, model_args=None) -> list[str]:
    """Every problem of `job` at `world_size` (and with the model, when its arguments are given)."""
    p, t = job.parallel, job.train
    found = list(p.problems(world_size))
    if (job.model.hf is None) == (job.model.load is None):
        found.append("model.hf or model.load: set exactly one (an HF directory or a megatron-swift checkpoint)")
    found += data_problems(job.data, t, p)
    for name in ("attention_dropout", "hidden_dropout"):
        value = getattr(job.model, name)
        if value is not None and not 0 <= value < 1:
            found.append(f"model.{name}={value} must be in [0, 1)")
    for name in ("micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(t, name) < 1:
            found.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.bf16 and t.fp16:
        found.append("train.bf16 and train.fp16: choose one")
    if (t.fp8_format is None) != (t.fp8_recipe is None):
        found.append("train.fp8_format and train.fp8_recipe: set both or neither")
    if t.lr_warmup_fraction is not None and not 0 <= t.lr_warmup_fraction < 1:
        found.append(f"train.lr_warmup_fraction={t.lr_warmup_fraction} must be in [0, 1)")
    if t.epochs is not None and t.epochs <= 0:
        found.append(f"train.epochs={t.epochs} must be > 0")
    # Warmup must end before the decay does (megatron-core's scheduler asserts it): the decay length is
    # lr_decay_iters when set (a short run of a longer schedule is fine), else train_iters.
    decay_iters = t.lr_decay_iters or (t.train_iters if t.epochs is None else None)
    decay_name = "train.lr_decay_iters" if t.lr_decay_iters else "train.train_iters"
    if t.lr_warmup_fraction is None and decay_iters is not None and t.lr_warmup_iters >= max(decay_iters, 1):
        found.append(f"train.lr_warmup_iters={t.lr_warmup_iters} must be smaller than {decay_name}={decay_iters}")
    for name in ("eval_interval", "eval_iters"):
        value = getattr(t, name)
        if value is not None and value < 1:
            found.append(f"train.{name}={value} must be >= 1")
        elif value is not None and not (job.data.split_dataset_ratio or job.data.val_dataset):
            found.append(f"train.{name}: there is no validation data; set data.split_dataset_ratio (e.g. 0.05) "
                         "or data.val_dataset")  # fmt: skip
    if t.lr_decay_iters is not None and t.lr_decay_iters < 1:
        found.append(f"train.lr_decay_iters={t.lr_decay_iters} must be >= 1")
    if t.lr_decay_style == "WSD":
        wsd = t.lr_wsd_decay_iters
        if wsd is None or wsd < 1:
            found.append("train.lr_wsd_decay_iters: lr_decay_style=WSD needs the number of annealing iterations (>= 1)")
        elif decay_iters is not None and wsd > decay_iters:
            found.append(f"train.lr_wsd_decay_iters={wsd} exceeds the decay iterations ({decay_iters})")
    elif t.lr_wsd_decay_iters is not None:
        found.append("train.lr_wsd_decay_iters: only used with lr_decay_style=WSD")
    if t.min_lr > t.lr:
        found.append(f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}")
    if t.recompute_granularity == "full" and t.recompute_method is None:
        found.append("train.recompute_method: required with recompute_granularity=full (uniform or block)")
    if t.overlap_param_gather and not (t.use_distributed_optimizer and t.overlap_grad_reduce):
        found.append("train.overlap_param_gather: needs train.use_distributed_optimizer and train.overlap_grad_reduce")
    if t.ddp_bucket_size is not None and (t.ddp_bucket_size < 1 or not t.overlap_grad_reduce):
        found.append("train.ddp_bucket_size: must be >= 1 and needs train.overlap_grad_reduce (one bucket otherwise)")
    found += batch_problems(job, world_size)
    if t.train_type == "lora":
        found += job.lora.problems()
        etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
        if model_args is not None and model_args.is_moe and etp > 1:
            found.append(
                f"parallel.expert_tensor_parallel_size={etp}: LoRA on expert linears needs 1 (set "
                "parallel.expert_tensor_parallel_size: 1)"
            )
        expert_targets = sorted(set(job.lora.target_modules) & set(DORA_EXPERT_REACHING))
        if job.lora.use_dora and model_args is not None and model_args.is_moe and expert_targets:
            found.append(
                f"lora.use_dora: DoRA on routed-expert linears is not supported (PEFT has no DoRA for them), and "
                f"lora.target_modules {', '.join(expert_targets)} reaches them; target linear_qkv / linear_proj or a "
                "re: pattern that leaves out .local_experts."
            )
    expert_bias = bool(model_args.transformer.get("moe_router_enable_expert_bias")) if model_args else None
    found += moe_problems(job.moe, model_args.is_moe if model_args is not None else None, expert_bias)
    found += rlhf_problems(job)
    if model_args is not None and model_args.is_moe and t.task in (*PAIR_TASKS, KTO_TASK, RM_TASK):
        # megatron-core scales the router's auxiliary losses by the schedule's token count, which preference
        # losses set to the pair count: their weight against a TRL run is not checked yet.
        found.append(f"train.task={t.task}: preference training of MoE models is not built yet (the router's "
                     "auxiliary-loss scaling is unchecked); use a dense model")  # fmt: skip
    if model_args is not None and model_args.is_moe and p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        found.append("parallel.sequence_parallel: megatron-core trains MoE models at tensor parallel > 1 only with "
                     "sequence parallel; set parallel.sequence_parallel: true")  # fmt: skip
    if model_args is not None and model_args.is_mla and job.model.attention == "local" and job.model.spec != "te":
        found.append("model.attention=local: megatron-core 0.16's DotProductAttention cannot be built for "
                     "multi-latent attention; use model.attention=sdpa")  # fmt: skip
    windowed = model_args is not None and model_args.transformer.get("window_size") is not None
    if windowed and job.model.attention == "local" and job.model.spec != "te":
        found.append("model.attention=local: the sliding-window layers are checked against HF with our SDPA core "
                     "attention only; use model.attention=sdpa")  # fmt: skip
    if model_args is not None and model_args.position_embedding_type == "yarn" and job.model.apply_rope_fusion:
        found.append("model.apply_rope_fusion: Transformer Engine's fused RoPE has no YaRN cos/sin scale (the model's "
                     "rope_type yarn); set it to null or false")  # fmt: skip
    if job.train.train_type == "lora" and job.moe.moe_router_bias_update_rate:
        found.append("moe.moe_router_bias_update_rate: under LoRA the routing bias stays the base model's (it is "
                     "not part of the adapter); leave it unset")  # fmt: skip
    if model_args is not None:
        found += [f"model: {problem}" for problem in model_layout_problems(model_args, p) if problem not in found]
        found += vision_tuning.problems(t, model_args.vision)
        deepstack = model_args.vision is not None and model_args.vision.deepstack_field
        if deepstack and t.recompute_granularity == "full" and p.pipeline_model_parallel_size > 1:
            found.append(f"train.recompute_granularity=full with pipeline parallelism: {model_args.family.name}'s "
                         "DeepStack features are held from the embedding to the first decoder layers per "
                         "micro-batch, which a recomputing backward of an earlier micro-batch would not see; use "
                         "selective recompute or none")  # fmt: skip
        if model_args.vision is not None and t.task != "sft":
            found.append(f"train.task={t.task}: a vision-language model ({model_args.family.name}) trains with "
                         "train.task sft here")  # fmt: skip
    return found


def preflight_warnings(job: JobConfig, world_size: int, model_args, device_bytes: int | None = None) -> list[str]:
    """What may fail but need not, so it is warned about and never refused: the planner's estimated peak memory
    over the GPU's memory (megatron_swift/plan/; nothing on CPU)."""
    from megatron_swift.plan.runtime import memory_warnings

    return memory_warnings(job, world_size, model_args, device_bytes)


def batch_problems(job: JobConfig, world_size: int) -> list[str]:
    """How the global batch and the sequence split over the layout; every one is reported, each on its own."""
    p, t, seq_length = job.parallel, job.train, job.data.seq_length
    found = []
    # The batch split needs a valid layout and batch sizes (their own problems are reported elsewhere).
    if not p.problems(world_size) and t.micro_batch_size >= 1 and t.global_batch_size >= 1:
        dp = p.data_parallel_size(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            found.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
                f"{t.micro_batch_size} x data parallel {dp}"
            )
    # Context parallel splits each sequence into 2 x CP chunks (load balance of causal attention).
    cp = p.context_parallel_size
    if cp > 1 and seq_length % (2 * cp):
        found.append(f"data.seq_length={seq_length} is not divisible by 2 x context_parallel_size = {2 * cp}")
    # Sequence parallel scatters the sequence over the tensor-parallel ranks.
    if p.sequence_parallel and p.tensor_model_parallel_size > 1 and seq_length % p.tensor_model_parallel_size:
        found.append(
            f"data.seq_length={seq_length} is not divisible by tensor_model_parallel_size="
            f"{p.tensor_model_parallel_size} (sequence_parallel)"
        )
    return found


def data_problems(d: DataSection, t: TrainSection, p: ParallelConfig) -> list[str]:
    found = []
    if d.packing and p.context_parallel_size > 1:
        found.append("data.packing: packed rows are not split over context-parallel ranks; use context_parallel_size 1")
    if not d.dataset:
        found.append("data.dataset: at least one dataset (file, datasets dir or indexed prefix) is required")
    if d.seq_length < 2:
        found.append(f"data.seq_length={d.seq_length} must be >= 2")
    if d.max_length is not None and not 2 <= d.max_length <= d.seq_length + 1:
        found.append(f"data.max_length={d.max_length} must be in [2, seq_length + 1 = {d.seq_length + 1}]")
    if not 0 <= d.split_dataset_ratio < 1:
        found.append(f"data.split_dataset_ratio={d.split_dataset_ratio} must be in [0, 1)")
    elif d.split_dataset_ratio and d.val_dataset:
        found.append("data.val_dataset and data.split_dataset_ratio: validate on one of them (set the ratio to 0)")
    if d.dataset_num_proc < 1:
        found.append(f"data.dataset_num_proc={d.dataset_num_proc} must be >= 1")
    if d.streaming:
        for option, bad, why in (
            (
                "truncation_strategy",
                d.truncation_strategy == "delete",
                "=delete: use left or right (sample positions in a stream must not depend on tokenization)",
            ),
            ("packing", d.packing, ": packing needs the whole dataset tokenized (streaming=false)"),
            ("split_dataset_ratio", d.split_dataset_ratio > 0, ": no validation split of a stream"),
            ("dataset", any("#" in spec for spec in d.dataset), ": path#N mixing needs streaming=false"),
            ("streaming", t.epochs is not None, ": a stream has no length; set train.train_iters, not train.epochs"),
        ):
            if bad:
                found.append(f"data.{option}{why}")
    return found


def transformer_overrides(job: JobConfig, is_moe: bool = False) -> dict:
    """TransformerConfig fields that come from the training job: loss scaling, recompute, FP8, fusions, MoE."""
    import torch

    from megatron_swift.models.builder import use_transformer_engine
    from megatron_swift.training.fusions import Machine, resolve_fusions

    t = job.train
    overrides = dict(
        # Gradients are divided by the global loss-token count (see training/step.py).
        calculate_per_token_loss=True,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
    )
    for name in ("attention_dropout", "hidden_dropout"):
        if getattr(job.model, name) is not None:
            overrides[name] = getattr(job.model, name)
    if t.fp8_format:
        overrides.update(fp8=t.fp8_format, fp8_recipe=t.fp8_recipe)
    if is_moe:
        overrides.update(moe_overrides(job.moe, on_gpu=torch.cuda.is_available(), lora=t.train_type == "lora"))
    return overrides | resolve_fusions(job.model, use_transformer_engine(job.model.spec), Machine.detect())


def precision(job: JobConfig) -> str:
    return "bf16" if job.train.bf16 else "fp16" if job.train.fp16 else "fp32"


def environment_problems(job: JobConfig) -> list[str]:
    """What this machine cannot run: FP8 needs Transformer Engine on a GPU; context parallelism needs
    TE's attention or our SDPA core attention (models/attention.py) in the local spec; `model.kernels`
    must be available for the layer spec in use (models/kernel_modules.py); fusions forced on need what
    training/fusions.py lists."""
    import torch

    from megatron_swift._optional import has_transformer_engine
    from megatron_swift.config import ConfigError
    from megatron_swift.models.builder import use_transformer_engine
    from megatron_swift.models.kernel_modules import kernel_backends
    from megatron_swift.training.fusions import Machine, fusion_problems

    te_usable = torch.cuda.is_available() and has_transformer_engine() and job.model.spec != "local"
    found = []
    try:
        te_spec = use_transformer_engine(job.model.spec)
        kernel_backends(job.model.kernels, te_spec, job.model.fused_linear_cross_entropy)
        found += fusion_problems(job.model, te_spec, Machine.detect(), bf16=job.train.bf16)
    except ConfigError as exc:
        found.append(str(exc))
    if job.train.fp8_format and not te_usable:
        found.append("train.fp8_format: FP8 needs a CUDA GPU and transformer-engine (pip install '.[gpu]')")
    if job.moe.moe_token_dispatcher_type == "alltoall" and not torch.cuda.is_available():
        found.append("moe.moe_token_dispatcher_type=alltoall needs a CUDA GPU (megatron's all-to-all dispatcher "
                     "creates CUDA streams); use allgather or auto")  # fmt: skip
    if job.parallel.context_parallel_size > 1 and not te_usable and job.model.attention != "sdpa":
        found.append("parallel.context_parallel_size > 1 needs Transformer Engine attention (a CUDA GPU and "
                     "transformer-engine) or model.attention=sdpa")  # fmt: skip
    return found
