"""SwiGLU on megatron-core's fused linear_fc1 output, in pure torch: the reference.

The `torch` backend (autograd.TorchSwiGLU) is this arithmetic with a hand-written, cat-free backward.

linear_fc1 writes [gate | up] along the last dimension (per tensor-parallel rank: each rank holds its
own gate and up shards side by side), and megatron's MLP computes silu(gate) * up on that local tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(fc1_output: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(fc1_output, 2, dim=-1)
    return F.silu(gate) * up
