"""Weights, gradients and optimizer states per rank, exactly as the built model and optimizer hold them.

Three steps, each following the megatron-core code it mirrors:

1. `chunk_parameters`: every parameter of one model chunk in `named_parameters()` order, with its
   size on this rank (TP / expert-TP splits, local experts), whether it trains (LoRA freezes the base
   and adds adapters, `lora/apply.py`) and which DDP buffer takes it (`allreduce=False` expert weights
   when expert parallel; `shared_embedding` for tied embeddings across pipeline stages).
2. `buffer_layout`: megatron-core's `_ParamAndGradBuffer` over the trainable parameters, in reverse
   order, each start padded to 64 elements and each bucket end to lcm(DP, 128) with the distributed
   optimizer (the tied embedding in a bucket of its own), buckets closed at `bucket_size`.
3. `rank_static`: gradients are the fp32 buffer (`grad_reduce_in_fp32`); with the distributed optimizer
   the bf16 parameters live in the padded param buffer and each DP rank owns 1/DP of every bucket
   (`DistributedOptimizer._build_model_gbuf_range`): fp32 main copies and Adam's two fp32 moments for
   the parameter elements inside that range; without it, for every trainable parameter. torch's Adam
   also keeps one fp32 `step` scalar per parameter (piece); TE / Apex FusedAdam do not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.plan.layout import Chunk, Layout, Ops
from megatron_swift.tuners.lora.config import LoraConfig

DENSE, EXPERT = 0, 1
SAVE_ALIASES = {"embedding": "embedding", "output_layer": "output_layer", "router": "mlp.router"}


@dataclass
class Params:
    """One chunk's parameters in registration order (numpy arrays of equal length)."""

    numel: np.ndarray
    trainable: np.ndarray  # bool
    buffer: np.ndarray  # DENSE or EXPERT (which DDP buffer / data-parallel group reduces it)
    shared_embedding: np.ndarray  # bool
    lora: np.ndarray  # bool: a LoRA adapter matrix

    @classmethod
    def concat(cls, parts: list[Params]) -> Params:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class Linear:
    module: str  # path inside the layer
    out_full: int
    in_full: int
    split: int  # TP (or expert-TP) ranks sharing it
    mode: str  # column | row
    expert: bool


class Inventory:
    """Parameter lists per chunk for one model, layout and LoRA setting (cached per layer kind)."""

    def __init__(self, args: GPTModelArgs, layout: Layout, ops: Ops, lora: LoraConfig | None,
                 frozen: tuple[str, ...] = ()):  # fmt: skip
        """`frozen`: a vision-language model's parts that full training freezes (training/vision_tuning.py)."""
        self.args, self.layout, self.ops, self.lora = args, layout, ops, lora if layout.lora else None
        self.frozen = frozen if args.vision is not None and self.lora is None else ()
        t = args.transformer
        self.h, self.heads, self.groups, self.head_dim = (
            t["hidden_size"],
            t["num_attention_heads"],
            t["num_query_groups"],
            t["kv_channels"],
        )
        self.experts = t.get("num_moe_experts") or 0
        pattern = t.get("moe_layer_freq", 1)
        layers = t["num_layers"]
        self.moe_layers = [
            bool(self.experts) and bool(pattern[i] if isinstance(pattern, list) else i % pattern == 0)
            for i in range(layers)
        ]
        self._targets = self._lora_targets() if self.lora else None
        self._cache: dict[tuple, Params] = {}
        self._chunks: dict[Chunk, Params] = {}

    # --- LoRA target resolution (apply.py's matcher, over the names this module generates) ---
    def _lora_targets(self):
        from megatron_swift.tuners.lora.apply import hf_to_mcore_linear

        hf_names = hf_to_mcore_linear(self.args.family)
        shorts, regexes = set(), []
        for pattern in self.lora.target_modules:
            if pattern == "all-linear":
                shorts.update(self.args.family.lora_linears)
            elif pattern in self.args.family.lora_linears:
                shorts.add(pattern)
            elif pattern in hf_names:
                shorts.add(hf_names[pattern])
            elif pattern.startswith("re:"):
                regexes.append(re.compile(pattern[3:]))
        return shorts, regexes

    def _adapted(self, layer: int, linear: Linear) -> bool:
        shorts, regexes = self._targets
        if linear.module.rsplit(".", 1)[-1] in shorts:
            return True
        return any(regex.search(f"decoder.layers.{layer}.{linear.module}") for regex in regexes)

    def _saved(self, module: str) -> bool:
        """modules_to_save: trained in full."""
        return any(
            module == (s := SAVE_ALIASES.get(w, w)) or module.endswith("." + s) for w in self.lora.modules_to_save
        )

    # --- parameters ---
    def _layer_entries(self, layer: int, moe: bool) -> list:
        """(module, param, numel, buffer, Linear or None) of one transformer layer, registration order."""
        lay, h = self.layout, self.h
        t = self.args.transformer
        tp = lay.tp
        entries = []
        if not self.ops.te_spec or self.args.is_mla:  # TE fuses it into linear_qkv; MLA's spec keeps a TENorm
            entries.append(("input_layernorm", "weight", h, DENSE, None))
        entries += self._mla_entries() if self.args.is_mla else self._attention_entries()
        if not moe:
            ffn = t["ffn_hidden_size"]
            fc1 = Linear("mlp.linear_fc1", 2 * ffn, h, tp, "column", False)
            fc2 = Linear("mlp.linear_fc2", h, ffn, tp, "row", False)
            entries.append(
                (
                    "pre_mlp_layernorm" if not self.ops.te_spec else fc1.module,
                    "weight" if not self.ops.te_spec else "layer_norm_weight",
                    h,
                    DENSE,
                    None,
                )
            )
            return [*entries, *self._mlp_entries(fc1, fc2, ffn, h, tp, DENSE)]
        entries.append(("pre_mlp_layernorm", "weight", h, DENSE, None))
        entries.append(("mlp.router", "weight", self.experts * h, DENSE, None))
        if self.biased:
            entries.append(("mlp.router", "bias", self.experts, DENSE, None))
        ffn, etp = t["moe_ffn_hidden_size"], lay.etp
        # Expert weights go to the expert buffer (reduced over expert data parallel) when EP > 1, and when expert TP
        # is smaller than TP (models/builder.py: the TP ranks share the experts then).
        buffer = EXPERT if lay.ep > 1 or etp != tp else DENSE
        local = self.experts // lay.ep
        for j in range(local):
            path = f"mlp.experts.local_experts.{j}"
            fc1 = Linear(f"{path}.linear_fc1", 2 * ffn, h, etp, "column", True)
            fc2 = Linear(f"{path}.linear_fc2", h, ffn, etp, "row", True)
            entries += self._mlp_entries(fc1, fc2, ffn, h, etp, buffer)
        shared = t.get("moe_shared_expert_intermediate_size")
        if shared:
            if t.get("moe_shared_expert_gate"):
                entries.append(("mlp.shared_experts", "gate_weight", h, DENSE, None))
            fc1 = Linear("mlp.shared_experts.linear_fc1", 2 * shared, h, tp, "column", False)
            fc2 = Linear("mlp.shared_experts.linear_fc2", h, shared, tp, "row", False)
            entries += self._mlp_entries(fc1, fc2, shared, h, tp, DENSE)
        return entries

    @property
    def biased(self) -> bool:
        """megatron's add_bias_linear (gpt-oss): a bias on every linear, the router's included."""
        return bool(self.args.transformer.get("add_bias_linear"))

    def _mlp_entries(self, fc1: Linear, fc2: Linear, ffn: int, h: int, split: int, buffer) -> list:
        """A gated MLP's fc1 and fc2 (split `split` ways), each followed by its bias when linears are biased: fc1's
        split like its output, fc2's (a row-parallel output) whole."""
        entries = [(fc1.module, "weight", 2 * ffn * h // split, buffer, fc1)]
        if self.biased:
            entries.append((fc1.module, "bias", 2 * ffn // split, buffer, None))
        entries.append((fc2.module, "weight", ffn * h // split, buffer, fc2))
        if self.biased:
            entries.append((fc2.module, "bias", h, buffer, None))
        return entries

    def _attention_entries(self) -> list:
        h, d, tp, t = self.h, self.head_dim, self.layout.tp, self.args.transformer
        qkv_out = (self.heads + 2 * self.groups) * d
        qkv = Linear("self_attention.linear_qkv", qkv_out, h, tp, "column", False)
        proj = Linear("self_attention.linear_proj", h, self.heads * d, tp, "row", False)
        entries = []
        if t.get("softmax_type") == "learnable":  # attention sinks: one logit per head, in the core attention
            entries.append(("self_attention.core_attention", "softmax_offset", self.heads // tp, DENSE, None))
        entries.append((proj.module, "weight", h * self.heads * d // tp, DENSE, proj))
        if self.biased:  # a row-parallel output's bias, whole on every TP rank
            entries.append((proj.module, "bias", h, DENSE, None))
        if self.ops.te_spec:  # TE's LayerNormLinear registers its norm weight before its own weight
            entries.append((qkv.module, "layer_norm_weight", h, DENSE, None))
        entries.append((qkv.module, "weight", qkv_out * h // tp, DENSE, qkv))
        if t.get("add_qkv_bias") or self.biased:
            entries.append((qkv.module, "bias", qkv_out // tp, DENSE, None))
        if t.get("qk_layernorm"):
            entries += [
                ("self_attention.q_layernorm", "weight", d, DENSE, None),
                ("self_attention.k_layernorm", "weight", d, DENSE, None),
            ]
        return entries

    def _mla_entries(self) -> list:
        """megatron-core's MLASelfAttention: linear_proj, the q projection (direct, or down + up with q_lora_rank),
        kv down + up, then the latent norms (inside the up projections with TE's LayerNormLinear). The down
        projections are duplicated (whole on every TP rank) in both specs (models/mla.py says why)."""
        h, tp, t, te = self.h, self.layout.tp, self.args.transformer, self.ops.te_spec
        heads, q_lora, kv_lora = self.heads, t.get("q_lora_rank"), t["kv_lora_rank"]
        qk, rope, v = t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"]
        attn = "self_attention"
        proj = Linear(f"{attn}.linear_proj", h, heads * v, tp, "row", False)
        entries = [(proj.module, "weight", h * heads * v // tp, DENSE, proj)]

        def linear(name: str, out_full: int, in_full: int, split: int, norm: int = 0) -> None:
            lin = Linear(f"{attn}.{name}", out_full, in_full, split, "column", False)
            if norm and te:
                entries.append((lin.module, "layer_norm_weight", norm, DENSE, None))
            entries.append((lin.module, "weight", out_full * in_full // split, DENSE, lin))

        if q_lora:
            linear("linear_q_down_proj", q_lora, h, 1)
            linear("linear_q_up_proj", heads * (qk + rope), q_lora, tp, norm=q_lora)
        else:
            linear("linear_q_proj", heads * (qk + rope), h, tp)
        linear("linear_kv_down_proj", kv_lora + rope, h, 1)
        linear("linear_kv_up_proj", heads * (qk + v), kv_lora, tp, norm=kv_lora)
        if not te:
            if q_lora:
                entries.append((f"{attn}.q_layernorm", "weight", q_lora, DENSE, None))
            entries.append((f"{attn}.kv_layernorm", "weight", kv_lora, DENSE, None))
        return entries

    def _to_params(self, entries: list, layer: int | None) -> Params:
        numel, trainable, buffer, lora = [], [], [], []
        for module, _, n, buf, linear in entries:
            adapted = (
                self.lora is not None and linear is not None and layer is not None and self._adapted(layer, linear)
            )
            numel.append(n)
            buffer.append(buf)
            trainable.append(self._trains(module))
            lora.append(False)
            if adapted:  # LoraLinear: base (frozen) then lora_A [r, in], lora_B [out, r], this rank's shards
                r = self.lora.rank
                a_in = linear.in_full // linear.split if linear.mode == "row" else linear.in_full
                b_out = linear.out_full // linear.split if linear.mode == "column" else linear.out_full
                numel += [r * a_in, b_out * r]
                buffer += [buf, buf]
                trainable += [True, True]
                lora += [True, True]
        size = len(numel)
        return Params(
            np.array(numel, dtype=np.int64),
            np.array(trainable, dtype=bool),
            np.array(buffer, dtype=np.int8),
            np.zeros(size, dtype=bool),
            np.array(lora, dtype=bool),
        )

    def adapted_linears(self, layer: int) -> list[Linear]:
        """The linears of `layer` that carry a LoRA adapter (none without LoRA)."""
        if self.lora is None:
            return []
        entries = self._layer_entries(layer, self.moe_layers[layer])
        return [linear for *_, linear in entries if linear is not None and self._adapted(layer, linear)]

    def norms_frozen(self) -> bool:
        """LoRA freezes the norm weights unless modules_to_save names them."""
        return self.lora is not None and not any("norm" in name for name in self.lora.modules_to_save)

    def layer_key(self, layer: int) -> tuple:
        """Layers with equal keys have equal parameters (and activations)."""
        per_layer = self._targets is not None and bool(self._targets[1])  # regexes may pick single layers
        return self.moe_layers[layer], layer if per_layer else None

    def layer(self, layer: int) -> Params:
        moe = self.moe_layers[layer]
        key = self.layer_key(layer)
        if key not in self._cache:
            self._cache[key] = self._to_params(self._layer_entries(layer, moe), layer)
        return self._cache[key]

    def chunk(self, chunk: Chunk) -> Params:
        """This chunk's parameters on one rank, in `named_parameters()` order."""
        if chunk not in self._chunks:
            self._chunks[chunk] = self._build_chunk(chunk)
        return self._chunks[chunk]

    def _build_chunk(self, chunk: Chunk) -> Params:
        lay, h = self.layout, self.h
        vocab = self.args.padded_vocab_size // lay.tp
        tied = self.args.share_embeddings_and_output_weights
        parts = []
        if chunk.pre_process:
            shared = tied and lay.pp > 1
            parts.append(self._single("embedding", vocab * h, shared))
        parts += [self.layer(i) for i in chunk.layers]
        if chunk.post_process:
            parts.append(self._single("decoder.final_layernorm", h, False))
            if not (tied and chunk.pre_process):  # tied at PP1: the embedding weight is the output weight
                parts.append(self._single("output_layer", vocab * h, tied and lay.pp > 1))
        if chunk.pre_process and self.args.vision is not None:
            parts.append(self._vision_tower())
        return Params.concat(parts)

    def _trains(self, module: str) -> bool:
        """A language-model parameter trains: in full training unless freeze_llm, under LoRA in modules_to_save."""
        return "llm" not in self.frozen if self.lora is None else self._saved(module)

    def _vision_tower(self) -> Params:
        """The vision tower's parameters (models/vlm.py: registered after the language model's, on the first stage,
        whole on every TP rank), from HF's own module built on the meta device."""
        import torch

        from megatron_swift.training.vision_tuning import part_of

        tower = self.args.vision
        with torch.device("meta"):
            module = tower.build(self.args.vision_config, torch.float32)
        named = list(module.named_parameters())
        size = len(named)
        trainable = [self.lora is None and part_of(f"{tower.module_name}.{name}", tower) not in self.frozen
                     for name, _ in named]  # fmt: skip
        return Params(
            np.array([param.numel() for _, param in named], dtype=np.int64),
            np.array(trainable, dtype=bool),
            np.full(size, DENSE, dtype=np.int8),
            np.zeros(size, dtype=bool),
            np.zeros(size, dtype=bool),
        )

    def _single(self, module: str, numel: int, shared: bool) -> Params:
        trainable = self._trains(module)
        return Params(
            np.array([numel], dtype=np.int64),
            np.array([trainable]),
            np.array([DENSE], dtype=np.int8),
            np.array([shared]),
            np.array([False]),
        )


@dataclass
class Buffer:
    """One DDP buffer: total padded elements, and each trainable parameter's [start, end) in it."""

    numel: int
    starts: np.ndarray
    ends: np.ndarray
    buckets: list[tuple[int, int]]

    def owned(self, dp: int) -> tuple[np.ndarray, np.ndarray]:
        """Per DP rank: (parameter elements, parameter pieces) inside its 1/DP shard of every bucket."""
        order = np.argsort(self.starts, kind="stable")
        starts, ends = self.starts[order], self.ends[order]  # disjoint, so ends are sorted too
        prefix = np.concatenate([[0], np.cumsum(ends - starts)])
        elements, pieces = np.zeros(dp, dtype=np.int64), np.zeros(dp, dtype=np.int64)
        for first, last in self.buckets:
            bounds = first + np.arange(dp + 1, dtype=np.int64) * ((last - first) // dp)
            covered = _covered(starts, ends, prefix, bounds)
            elements += covered[1:] - covered[:-1]
            pieces += np.searchsorted(starts, bounds[1:], side="left") - np.searchsorted(
                ends, bounds[:-1], side="right"
            )
        return elements, pieces


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def buffer_layout(numel: np.ndarray, shared: np.ndarray, dp: int, distributed: bool, bucket_size: int | None) -> Buffer:
    """megatron-core `_ParamAndGradBuffer.__init__`'s index arithmetic over `numel` (registration order)."""
    sizes, shared = numel[::-1], shared[::-1]  # the buffer runs in reverse registration order
    count = len(sizes)
    starts, ends = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    if not distributed:  # no padding; buckets only matter for the distributed optimizer's shards
        ends[:] = np.cumsum(sizes)
        starts[:] = ends - sizes
        total = int(ends[-1]) if count else 0
        return Buffer(total, starts[::-1], ends[::-1], [(0, total)])
    bucket_divisor = math.lcm(dp, 128)
    padded = -(-sizes // 64) * 64  # every param start is padded to 64 elements
    buckets, position, index = [], 0, 0
    while index < count:
        bucket_start = position
        if shared[index]:  # the tied embedding: a bucket of its own
            stop = index + 1
        else:
            # Within a bucket param i ends at bucket_start + sum(padded sizes before it) + its size; the bucket
            # closes at the first param whose end reaches bucket_size (or before a shared embedding).
            offsets = np.cumsum(padded[index:]) - padded[index:] + sizes[index:]
            stop = count
            if bucket_size is not None:
                stop = min(count, index + int(np.searchsorted(offsets, bucket_size, side="left")) + 1)
            nxt = np.flatnonzero(shared[index:stop])
            if nxt.size:
                stop = index + int(nxt[0])
        rel = np.cumsum(padded[index:stop]) - padded[index:stop]
        starts[index:stop] = bucket_start + rel
        ends[index:stop] = starts[index:stop] + sizes[index:stop]
        position = _pad(int(ends[stop - 1]), bucket_divisor)
        buckets.append((bucket_start, position))
        index = stop
    return Buffer(position, starts[::-1], ends[::-1], buckets or [(0, 0)])


def _covered(starts: np.ndarray, ends: np.ndarray, prefix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Parameter elements below each buffer index in x (parameters disjoint and sorted)."""
    full = np.searchsorted(ends, x, side="right")  # parameters ending at or before x
    inside = np.minimum(full, len(starts) - 1)
    partial = np.where((full < len(starts)) & (starts[inside] < x), x - starts[inside], 0)
    return prefix[full] + partial


@dataclass
class StaticBytes:
    weights: int
    grads: int
    optimizer: int
    lora_params: int  # adapter elements on this rank (within weights)
    rank_in_stage: int


def stage_static(inventory: Inventory, pp_rank: int) -> list[StaticBytes]:
    """Every rank of pipeline stage `pp_rank` (index = rank within the stage); with the distributed
    optimizer ranks differ in the parameter elements their shards hold, otherwise they are equal."""
    lay, ops = inventory.layout, inventory.ops
    e = lay.dtype_bytes
    main_bytes = (4 if lay.mixed_precision else 0) + 8  # fp32 main copy (mixed precision) + Adam's two moments
    step_bytes = 0 if ops.fused_adam else 4
    weights = grads = lora = 0
    groups = {DENSE: lay.dp * lay.cp, EXPERT: lay.edp}
    shards: dict[int, list[Buffer]] = {DENSE: [], EXPERT: []}
    optimizer_full = 0
    for index, chunk in enumerate(lay.stage_chunks(pp_rank)):
        params = inventory.chunk(chunk)
        frozen = int(params.numel[~params.trainable].sum())
        lora += int(params.numel[params.lora].sum())
        weights += frozen * e
        # megatron-core: no buckets on stages after the first and for model chunks after the first
        bucket = lay.bucket_size if pp_rank == 0 and index == 0 else None
        for kind in (DENSE, EXPERT):
            mask = params.trainable & (params.buffer == kind)
            if not mask.any():
                continue
            buf = buffer_layout(
                params.numel[mask], params.shared_embedding[mask], groups[kind], lay.distributed_optimizer, bucket
            )
            grads += buf.numel * 4
            count, elements = int(mask.sum()), int(params.numel[mask].sum())
            if lay.distributed_optimizer:
                weights += buf.numel * e
                shards[kind].append(buf)
            else:
                weights += elements * e
                optimizer_full += elements * main_bytes + count * step_bytes
    ranks = lay.world // lay.pp
    if not lay.distributed_optimizer:
        return [StaticBytes(weights, grads, optimizer_full, lora, r) for r in range(ranks)]
    # Each rank: its dense shard (DP x CP group) and its expert shard (expert DP group); within a stage ranks
    # are ordered tp-cp-dp for dense parameters and etp-ep-edp for experts (megatron-core's rank order).
    dense = _shard_bytes(shards[DENSE], groups[DENSE], main_bytes, step_bytes)
    expert = _shard_bytes(shards[EXPERT], groups[EXPERT], main_bytes, step_bytes)
    return [
        StaticBytes(weights, grads, int(dense[r // lay.tp] + expert[r // (lay.etp * lay.ep)]), lora, r)
        for r in range(ranks)
    ]


def _shard_bytes(buffers: list[Buffer], dp: int, main_bytes: int, step_bytes: int) -> np.ndarray:
    total = np.zeros(dp, dtype=np.int64)
    for buf in buffers:
        elements, pieces = buf.owned(dp)
        total += elements * main_bytes + pieces * step_bytes
    return total
