"""SwiGLU on the fused fc1 output: pure-torch reference, Triton forward/backward, autograd wrapper."""

from kernels.swiglu.autograd import swiglu

__all__ = ["swiglu"]
