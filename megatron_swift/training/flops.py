"""Model FLOPs per trained token and MFU, with a stated convention.

Convention (what `mfu` in metrics.jsonl means):
- matrix multiplies only, 2 FLOPs per multiply-add; a training step is 3x the forward pass
  (forward + backward for inputs and weights); activation recomputation is NOT counted; with LoRA
  (frozen base) it is 2x: frozen matrices compute no weight gradient, and the rank-r adapters'
  own multiplies are left out (under 1% of a layer at rank <= 64 and hidden >= 2048);
- per token: q/k/v projections with GQA (num_query_groups k/v heads), output projection, SwiGLU MLP
  (three matrices), for MoE the router plus top-k routed experts plus the shared expert, and the
  output layer over the real (unpadded) vocabulary; multi-latent attention counts its own linears: q
  (down to q_lora_rank and up, or direct), kv down to kv_lora_rank + the rope key, kv up to every head's
  key and value, output projection;
- attention scores and the attention-weighted sum over a causal sequence: on average half of the
  sequence is attended, 2 * 2 * (seq / 2) * heads * head_dim per token (newer Megatron-LM's
  convention; torchtitan counts the full square, which reports a higher MFU); with MLA the scores use
  the query / key head size (nope + rope) and the sum the value head size; a sliding-window layer (megatron's
  `window_size` on the layers `window_attn_skip_freq` picks) attends on average to the same continuous count
  over its window, W - W^2 / (2 seq) keys for a window of W = left + 1 < seq (seq / 2 otherwise).
MFU = FLOPs per token x tokens per second / (peak dense FLOP/s of the device x devices).
"""

from __future__ import annotations

# Dense peak FLOP/s per device (no sparsity), by precision. Names match torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp8": 1979e12},
    "H100": {"bf16": 989e12, "fp8": 1979e12},
    "A100": {"bf16": 312e12},
    "L40S": {"bf16": 362e12, "fp8": 733e12},
}


def flops_per_token(t: dict, vocab_size: int, seq_length: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token for TransformerConfig keyword arguments `t` (see module docstring)."""
    h = t["hidden_size"]
    attention = t["num_layers"] * attention_flops(t, seq_length)[0]
    if t.get("num_moe_experts"):
        pattern = t.get("moe_layer_freq", 1)
        sparse = pattern if isinstance(pattern, list) else [int(i % pattern == 0) for i in range(t["num_layers"])]
        mlp = sum(mlp_flops(t, bool(is_moe)) for is_moe in sparse)
    else:
        mlp = t["num_layers"] * mlp_flops(t, False)
    forward = attention + mlp + 2 * h * vocab_size
    return (2 if frozen_weights else 3) * forward


def mlp_flops(t: dict, moe: bool) -> float:
    """Forward FLOPs per token of one layer's MLP: SwiGLU, or the router + top-k experts + the shared expert."""
    h = t["hidden_size"]
    if not moe:
        return 2 * 3 * h * t["ffn_hidden_size"]
    routed = 2 * h * t["num_moe_experts"] + t["moe_router_topk"] * 2 * 3 * h * t["moe_ffn_hidden_size"]
    return routed + 2 * 3 * h * (t.get("moe_shared_expert_intermediate_size") or 0)


def _attended_keys(t: dict, layer_number: int, seq_length: int) -> float:
    """Keys a query of layer `layer_number` (1-based, as megatron's) attends to on average (module docstring)."""
    window, pattern = t.get("window_size"), t.get("window_attn_skip_freq")
    windowed = window is not None and (
        pattern is None or (pattern[layer_number - 1] if isinstance(pattern, list) else layer_number % pattern != 0)
    )
    width = window[0] + 1 if windowed else seq_length
    if width >= seq_length:
        return seq_length / 2
    return width - width**2 / (2 * seq_length)


def attention_flops(t: dict, seq_length: int) -> tuple[float, float]:
    """Forward FLOPs per token of one attention layer, averaged over the model's layers (sliding windows differ):
    (all of it, the core attention's share)."""
    h, heads = t["hidden_size"], t["num_attention_heads"]
    if not t.get("multi_latent_attention"):
        groups, head_dim, layers = t["num_query_groups"], t["kv_channels"], t["num_layers"]
        attended = sum(_attended_keys(t, layer, seq_length) for layer in range(1, layers + 1)) / layers
        core = 2 * 2 * attended * heads * head_dim
        return 2 * h * (heads + 2 * groups) * head_dim + 2 * heads * head_dim * h + core, core
    # Multi-latent attention (megatron-core's MLATransformerConfig names)
    q_lora = t.get("q_lora_rank")
    qk_head, v_head = t["qk_head_dim"] + t["qk_pos_emb_head_dim"], t["v_head_dim"]
    q = 2 * (h * q_lora + q_lora * heads * qk_head) if q_lora else 2 * h * heads * qk_head
    kv = 2 * h * (t["kv_lora_rank"] + t["qk_pos_emb_head_dim"]) + 2 * t["kv_lora_rank"] * heads * (
        t["qk_head_dim"] + v_head
    )
    core = 2 * (seq_length / 2) * heads * (qk_head + v_head)
    return q + kv + 2 * heads * v_head * h + core, core


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of one device, or None when the device or precision is not in the table."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None
