"""Fused linear + cross entropy (chunked, vocab-parallel): torch and Triton chunk steps, autograd wrapper."""

from megatron_swift_kernels.fused_linear_cross_entropy.autograd import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
