"""Activation memory of one training step per pipeline stage: what autograd keeps, and the peak on top.

Structure of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
the formulas of Megatron-LM's `theoretical_memory_usage.py`): bytes per layer per micro-batch, divided
by TP where tensor parallelism splits the tensor and, with sequence parallelism, in the norms and the
residual stream too; selective recomputation drops the core attention's internals, full recomputation
keeps only each recomputed group's input; the pipeline schedule decides how many micro-batches are in
flight (1F1B: PP - stage; interleaved: megatron-core's warm-up count + 1, each a model chunk).

The per-tensor terms are for the modules this engine builds (GQA, SwiGLU, RMSNorm, rotary, no dropout
unless configured), not the paper's GPT-3 layer, and depend on the implementation (`Ops`):
- RMSNorm: torch reference keeps the input in fp32 and the normalised output (4 + e bytes / element);
  the Triton kernel and TE's LayerNormLinear keep the input (e). The following linear keeps its input
  (e), locally under SP (megatron re-gathers it in backward).
- Attention: SDPA keeps contiguous q, k, v (k, v gathered over CP), the output (which linear_proj keeps
  as a view) and the fp32 log-sum-exp; TE keeps rope'd q, k, the fused qkv output (v is a view of it)
  and the output; megatron's local attention the [s, s] probabilities. Unfused rotary keeps cos / sin
  tables per layer. Selective recomputation keeps the core attention's inputs instead.
- Multi-latent attention (MLA): the same core attention over q / k of width heads x (qk + rope) and v of
  heads x v_head (SDPA: padded to the q width, with a padded output); before it the latent path: the
  q / kv down projections' outputs (duplicated linears, on this rank's SP tokens), their RMSNorms, and
  the up projections' inputs (column-parallel: kept locally).
- SwiGLU: our torch kernel keeps fc1's output and silu(gate) (3f), Triton / bias_swiglu fc1's output
  (2f), megatron's unfused glu 4f; plus fc2's input (f). Experts: megatron's MLP with the routing
  probabilities multiplied in (6f unfused, 3f fused) on this rank's routed tokens (balanced routing).
- Loss: logits in the activation dtype, masked copy where this TP rank holds vocabulary padding, the
  fp32 softmax cross entropy keeps; or the fused linear cross entropy's gradients (kernels/).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.plan.layout import Chunk, Layout
from megatron_swift.plan.params import Inventory, Linear

FUSED_LOSS_CHUNK_ELEMENTS = 1 << 23  # kernels/fused_linear_cross_entropy: fp32 logits per vocabulary chunk


@dataclass
class StageActivations:
    layers: int  # kept by the in-flight micro-batches at the peak
    logits: int  # the loss's share of the peak (last stage)
    temporary: int  # transients at the peak: one layer's backward, a recomputed group, SP gather buffer
    in_flight: int  # micro-batches (model-chunk micro-batches with VPP) whose activations are kept

    @property
    def total(self) -> int:
        return self.layers + self.logits + self.temporary


class ActivationModel:
    def __init__(self, args: GPTModelArgs, inventory: Inventory, *, hidden_dropout: float = 0.0, packing: bool = False):
        layout, ops = inventory.layout, inventory.ops
        self.args, self.lay, self.ops, self.moe_layers = args, layout, ops, inventory.moe_layers
        self.inventory = inventory
        self.frozen_norms = inventory.norms_frozen()
        self._layers: dict[tuple, int] = {}
        self._chunks: dict[Chunk, int] = {}
        t = args.transformer
        self.h, self.d = t["hidden_size"], t["kv_channels"]
        self.nq, self.nkv = t["num_attention_heads"] // layout.tp, t["num_query_groups"] // layout.tp
        self.mla = args.is_mla
        if self.mla:  # widths on this rank of the core attention's q, k, v and output
            qk, self.rope_dim = t["qk_head_dim"] + t["qk_pos_emb_head_dim"], t["qk_pos_emb_head_dim"]
            self.q_width, self.k_width, self.v_width = self.nq * qk, self.nq * qk, self.nq * t["v_head_dim"]
        else:
            self.rope_dim = self.d
            self.q_width, self.k_width, self.v_width = self.nq * self.d, self.nkv * self.d, self.nkv * self.d
        self.out_width = self.nq * (t["v_head_dim"] if self.mla else self.d)
        # SDPA pads narrower value heads to the query's head size (models/attention.py): it keeps padded v and
        # output, and linear_proj its own unpadded copy of the output.
        self.padded_v = self.mla and self.ops.attention == "sdpa" and self.v_width < self.q_width
        if self.padded_v:
            self.v_width = self.q_width
        self.ffn = t["ffn_hidden_size"] // layout.tp
        self.experts = t.get("num_moe_experts") or 0
        self.topk = t.get("moe_router_topk", 0)
        self.expert_ffn = (t.get("moe_ffn_hidden_size") or 0) // layout.etp
        self.shared_ffn = (t.get("moe_shared_expert_intermediate_size") or 0) // layout.tp
        self.shared_gate = bool(t.get("moe_shared_expert_gate"))
        self.qk_norm = bool(t.get("qk_layernorm")) and not self.mla  # MLA's are the latent norms
        self.aux_loss = t.get("moe_router_load_balancing_type", "aux_loss") != "none"
        self.hidden_dropout, self.packing = hidden_dropout, packing
        self.vocab = args.padded_vocab_size // layout.tp
        # The last TP rank's shard holds megatron's vocabulary padding: masking it copies the logits.
        self.vocab_padded = args.padded_vocab_size > args.vocab_size

    # --- building blocks (bytes for one micro-batch on one rank) ---
    def norm(self, rows: int, width: int) -> int:
        e = self.lay.dtype_bytes
        if self.ops.norm == "torch":  # with a frozen weight (LoRA) the normalised output is not kept
            return rows * (width * (4 if self.frozen_norms else 4 + e) + 4)
        return rows * (width * e + 4)

    def attention_core(self) -> int:
        """What the core attention keeps (the part selective recomputation drops)."""
        e, T, lay = self.lay.dtype_bytes, self.lay.tokens, self.lay
        q, k, v, out = self.q_width, self.k_width, self.v_width, self.out_width
        if self.ops.attention == "te":
            return T * (e * (q + k) + e * (q + k + v) + e * out + 4 * self.nq)
        if self.ops.attention == "local":
            # q, k / v repeated to every head, the softmax's fp32 output [b, heads, s, s] and its cast for the
            # probabilities x v product, the context copy linear_proj keeps
            s = self._row_length()
            probs = 4 * self.nq * s + (e * self.nq * s if e != 4 else 0)
            return T * (e * 3 * q + probs + e * q)
        # SDPA: contiguous q, k, v (k, v gathered over CP), output, fp32 log-sum-exp
        if self.padded_v:
            out += self.v_width
        return T * (e * (q + (k + v) * lay.cp) + e * out + 4 * self.nq)

    def _row_length(self) -> int:
        """Tokens one attention row spans: the sequence on this CP rank, or a whole packed micro-batch."""
        return self.lay.tokens if self.packing else self.lay.tokens // self.lay.micro_batch_size

    def attention_inputs(self) -> int:
        """Selective recomputation keeps the core attention's inputs: rope'd q, k and the projections' output."""
        e, T = self.lay.dtype_bytes, self.lay.tokens
        q, k = self.q_width, self.k_width
        if self.mla:  # q and k concatenated from their rope'd parts; v a view of kv_up's output [k_nope; v]
            t = self.args.transformer
            return T * e * (q + k + self.nq * (t["qk_head_dim"] + t["v_head_dim"]))
        return T * e * ((q + k) + (q + k + self.v_width))

    def rope_tables(self) -> int:
        """Unfused rotary: cos and sin [s, 1, 1, d] in the activation dtype, for q and for k, each layer."""
        if self.ops.rope_fused:
            return 0
        return 4 * (self.lay.tokens // self.lay.micro_batch_size) * self.rope_dim * self.lay.dtype_bytes

    def mla_latents(self) -> int:
        """MLA before its core attention: the kv down projection's output (its rope key part gathered over SP
        and freed, the latent part normalised), each latent's RMSNorm and the up projection's local input."""
        if not self.mla:
            return 0
        e, Tsp, t = self.lay.dtype_bytes, self.lay.sp_tokens, self.args.transformer
        q_lora, kv_lora = t.get("q_lora_rank"), t["kv_lora_rank"]
        total = Tsp * e * self.rope_dim + self.norm(Tsp, kv_lora) + Tsp * kv_lora * e
        if q_lora:
            total += self.norm(Tsp, q_lora) + Tsp * q_lora * e
        return total

    def attention_block(self, selective: bool) -> int:
        e, Tsp, T = self.lay.dtype_bytes, self.lay.sp_tokens, self.lay.tokens
        total = self.norm(Tsp, self.h) + Tsp * self.h * e  # input norm, the projections' input
        if self.qk_norm:
            total += self.norm(T * self.nq, self.d) + self.norm(T * self.nkv, self.d)
        total += self.rope_tables() + self.mla_latents()
        if selective:
            # The core attention's output is recomputed too; linear_proj keeps its own copy.
            total += self.attention_inputs() + T * e * self.out_width
        else:
            total += self.attention_core()
        return total

    def dense_mlp(self) -> int:
        e, Tsp, T, f = self.lay.dtype_bytes, self.lay.sp_tokens, self.lay.tokens, self.ffn
        act = {"torch": 3 * f, "fused": 2 * f, "glu": 4 * f}[self.ops.mlp_act]
        return self.norm(Tsp, self.h) + Tsp * self.h * e + T * e * (act + f)

    def routed_tokens(self) -> int:
        """Tokens this rank's experts process per micro-batch, with balanced routing: each rank's SP tokens
        go to top-k experts; the all-gather dispatcher gathers them over expert-TP x EP."""
        return self.lay.sp_tokens * self.lay.etp * self.topk

    def moe_mlp(self) -> int:
        e, Tsp, h, k, E = self.lay.dtype_bytes, self.lay.sp_tokens, self.h, self.topk, self.experts
        total = self.norm(Tsp, h) + Tsp * h * e  # pre-MLP norm; its output kept by the router / shared fc1
        # Router: top-k indices and probabilities (+ scores and indices of the auxiliary loss); dispatcher:
        # permutation indices, routing map and probabilities over the (gathered) tokens.
        total += Tsp * (8 * k + 4 * k + ((4 * E + 8 * k) if self.aux_loss else 0))
        gathered = Tsp * (1 if self.ops.alltoall else self.lay.etp * self.lay.ep)
        total += gathered * (8 * k + 5 * E)
        routed, f = self.routed_tokens(), self.expert_ffn
        act = 3 * f if self.ops.expert_act == "fused" else 6 * f
        total += routed * (e * h + e * act + 4)
        if self.shared_ffn:
            fs = self.shared_ffn
            shared_act = 3 * fs if self.ops.expert_act == "fused" else 5 * fs
            total += self.lay.tokens * e * shared_act
            if self.shared_gate:
                total += Tsp * (e * h + e)
        return total

    def lora(self, linear: Linear) -> int:
        """A LoRA adapter keeps lora_A's output (rank r) for lora_B and, on a column-parallel linear under SP,
        the sequence-gathered input it computes lora_A from (the base linear keeps only its local input)."""
        e, lay = self.lay.dtype_bytes, self.lay
        rows = lay.tokens
        if linear.expert:  # per local expert: its share of this rank's routed tokens
            rows = self.routed_tokens() * lay.ep // max(self.experts, 1)
        kept = rows * e * self.inventory.lora.rank
        if linear.mode == "column" and lay.sp and not linear.expert:
            kept += lay.tokens * linear.in_full * e
        return kept

    def layer(self, index: int, selective: bool) -> int:
        """Kept by layer `index` for one micro-batch."""
        key = (self.inventory.layer_key(index), selective)
        if key not in self._layers:
            self._layers[key] = self._layer(index, selective)
        return self._layers[key]

    def _layer(self, index: int, selective: bool) -> int:
        mlp = self.moe_mlp() if self.moe_layers[index] else self.dense_mlp()
        # hidden dropout: a bool mask after attention and after the MLP
        masks = 2 * self.lay.sp_tokens * self.h if self.hidden_dropout else 0
        adapters = sum(self.lora(linear) for linear in self.inventory.adapted_linears(index))
        return self.attention_block(selective) + mlp + masks + adapters

    def norm_backward(self, rows: int, width: int) -> int:
        """Transient of a norm's backward: the torch reference's autograd makes three fp32 [rows, width]
        gradients at once (of the normalised product, the power and the fp32 cast); fused kernels one dx."""
        e = self.lay.dtype_bytes
        return rows * width * (3 * 4 if self.ops.norm == "torch" else e)

    def backward_working(self, index: int) -> int:
        """Largest transient of one layer's backward over what the layer keeps (each autograd node frees its
        saved tensors when done): the activation's input gradient while fc2's input is already freed, fc1's
        weight gradient (a bf16 temporary without gradient_accumulation_fusion), or a norm's backward; plus
        the gradient of the residual stream flowing through the layer."""
        e, T, Tsp, h = self.lay.dtype_bytes, self.lay.tokens, self.lay.sp_tokens, self.h
        wgrad = 0 if self.ops.wgrad_fused else e
        if self.moe_layers[index]:
            rows, f = self.routed_tokens(), self.expert_ffn
            act = 3 * f if self.ops.expert_act == "glu" else 2 * f
            mlp = max(rows * e * act, rows * e * h + wgrad * 2 * f * h)
            mlp = max(mlp, Tsp * self.lay.etp * self.lay.ep * e * h * 2)  # gathered token gradients
        else:
            f = self.ffn
            act = {"torch": 3 * f, "fused": 2 * f, "glu": 3 * f}[self.ops.mlp_act]
            mlp = max(T * e * act, T * e * h + wgrad * 2 * f * h)
        return max(mlp, self.norm_backward(Tsp, h)) + Tsp * e * h

    # --- chunks and the pipeline ---
    def chunk(self, chunk: Chunk) -> int:
        """Kept for one micro-batch through one model chunk (logits excluded)."""
        if chunk not in self._chunks:
            self._chunks[chunk] = self._chunk(chunk)
        return self._chunks[chunk]

    def _chunk(self, chunk: Chunk) -> int:
        lay, e = self.lay, self.lay.dtype_bytes
        boundary = lay.sp_tokens * self.h * e
        total = 8 * lay.tokens if chunk.pre_process else 0  # token ids kept by the embedding
        layers = list(chunk.layers)
        if lay.recompute == "full":
            kept = self._recomputed_kept(layers)
            total += sum(self.layer(i, False) for i in layers[kept[0] :]) + kept[1] * boundary
        else:
            total += sum(self.layer(i, lay.recompute == "selective") for i in layers)
        if not chunk.pre_process and (self.ops.norm == "torch" and e == 2) and lay.recompute != "full":
            total += boundary  # the schedule keeps the received input; the torch norm keeps an fp32 copy
        if not chunk.post_process:
            total += boundary  # the schedule keeps the sent output (deallocate_pipeline_outputs is off)
        return total

    def _recomputed_kept(self, layers: list[int]) -> tuple[int, int]:
        """(first layer index in `layers` that is not recomputed, checkpoint inputs kept)."""
        lay, n = self.lay, self.lay.recompute_num_layers
        if lay.recompute_method == "block":
            return min(n, len(layers)), min(n, len(layers))
        return len(layers), -(-len(layers) // n)

    def recompute_working(self, chunk: Chunk) -> int:
        """Full recomputation re-runs one checkpointed group of one micro-batch in backward: recompute_num_layers
        layers (uniform) or one layer (block). With the block method the layers after the checkpointed ones
        have finished their backward by then, and their activations are freed."""
        lay = self.lay
        if lay.recompute != "full" or not chunk.layers:
            return 0
        layers = list(chunk.layers)
        if lay.recompute_method == "block":
            recomputed = min(lay.recompute_num_layers, len(layers))
            freed = sum(self.layer(i, False) for i in layers[recomputed:])
            return self.layer(layers[0], False) - freed if recomputed else 0
        return sum(self.layer(i, False) for i in layers[: lay.recompute_num_layers])

    def loss(self) -> int:
        """The loss's peak over the kept layer activations (last stage): the final norm and the output
        layer's input are kept, then the largest of the cross entropy's forward (fp32 softmax kept, logits,
        their masked copy on the rank holding vocabulary padding), the output layer's backward (logits
        gradient, weight-gradient temporary) and the final norm's backward."""
        e, T, Tsp, V, h = self.lay.dtype_bytes, self.lay.tokens, self.lay.sp_tokens, self.vocab, self.h
        final = self.norm(Tsp, h) + Tsp * h * e
        weight_grad = 0 if self.ops.wgrad_fused else e * V * h
        if self.ops.loss == "fused_linear":
            # Both gradients are formed in the forward and kept (kernels/fused_linear_cross_entropy), the
            # vocabulary is walked in fp32 chunks of logits and their gradient.
            chunk = min(FUSED_LOSS_CHUNK_ELEMENTS, T * V)
            loss = T * h * e * 2 + 4 * V * h + 2 * 4 * chunk
        else:
            forward = T * (4 * V + 13) + T * e * V * (2 if self.vocab_padded else 1)
            loss = max(forward, T * e * V + T * e * h + weight_grad)
        return final + max(loss, T * e * h + self.norm_backward(Tsp, h))

    def stage(self, pp_rank: int) -> StageActivations:
        """Peak of the stage: everything the in-flight micro-batches keep, plus the larger of the loss's
        peak (last stage) and the first layer backward's transient (with full recomputation, one group's
        activations rebuilt); plus buffers that persist through the step."""
        lay = self.lay
        chunks = lay.stage_chunks(pp_rank)
        flights = in_flight_chunks(lay, pp_rank)
        kept = sum(self.chunk(chunks[c]) for c in flights)
        kinds = {self.moe_layers[i]: i for c in chunks for i in c.layers}  # dense and MoE layers differ
        working = max((self.backward_working(i) for i in kinds.values()), default=0)
        working += max(0, max(self.recompute_working(c) for c in chunks))
        logits = self.loss() if chunks[-1].post_process else 0
        persistent = 0
        if lay.sp:
            persistent += lay.tokens * self.h * lay.dtype_bytes  # megatron's global all-gather buffer
        if self.packing and self.ops.attention == "sdpa":
            persistent += lay.tokens * lay.tokens  # the cached block-diagonal causal mask (bool)
        if self.ops.attention == "local":  # megatron's global buffer for the [b x heads, s, s] scores; causal mask
            persistent += lay.tokens * self.nq * self._row_length() * lay.dtype_bytes + self._row_length() ** 2
        return StageActivations(kept, logits, max(working - logits, 0) + persistent, len(flights))


def in_flight_chunks(lay: Layout, pp_rank: int) -> list[int]:
    """Model-chunk index of each micro-batch whose activations pipeline rank `pp_rank` keeps at once:
    megatron-core's warm-up forwards plus the first steady-state one (`get_pp_rank_microbatches`), chunks
    taken in `get_schedule_table` order (groups of PP micro-batches per model chunk)."""
    m, pp, vpp = lay.num_microbatches, lay.pp, lay.vpp
    if pp == 1:
        return [0]
    total = m * vpp
    # 1F1B: PP - rank - 1 warm-up forwards; interleaved: two per later rank plus (VPP - 1) groups of PP
    warmup = pp - pp_rank - 1 if vpp == 1 else (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    count = min(warmup + 1, total)
    table = []
    for group_start in range(0, m, pp):
        ids = range(group_start, m) if group_start + pp >= m else range(group_start, group_start + pp)
        table += [chunk for chunk in range(vpp) for _ in ids]
        if group_start + pp >= m:
            break
    return table[:count]
