"""RMSNorm: pure-torch reference, Triton forward/backward kernels, autograd wrapper."""

from megatron_swift_kernels.rmsnorm.autograd import rms_norm

__all__ = ["rms_norm"]
