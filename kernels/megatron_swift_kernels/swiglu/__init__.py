"""SwiGLU on the fused fc1 output: pure-torch reference, Triton forward/backward, autograd wrapper."""

from megatron_swift_kernels.swiglu.autograd import swiglu

__all__ = ["swiglu"]
