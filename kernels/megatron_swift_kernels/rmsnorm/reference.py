"""RMSNorm in pure torch: the reference the Triton kernel is tested against, and the `torch` backend.

HF transformers' convention (LlamaRMSNorm), which the converted models must reproduce: statistics in
fp32, the normalised activations cast back to the input dtype, then scaled by the weight.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normalised.to(x.dtype)).to(x.dtype)
