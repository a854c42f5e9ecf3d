"""Triton kernels with pure-torch references, selectable per run.

One package per op (`rmsnorm`, `swiglu`, `rotary`, `fused_linear_cross_entropy`), each with
`reference.py` (pure torch: the tested reference and the `torch` backend), `triton_impl.py` (kernels
and launchers, imported only when the Triton backend runs) and `autograd.py` (the op as models call
it). `select.py` resolves `torch | triton | te | auto` per op. This package imports nothing from
megatron_swift or converters; megatron_swift/models/kernel_modules.py puts it into models.
"""
