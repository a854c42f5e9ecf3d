"""Kernel tests run the Triton kernels through Triton's CPU interpreter when there is no GPU.

`triton.jit` decides between compiling and interpreting when it decorates a kernel, i.e. when one of
our `kernels/*/triton_impl.py` modules is first imported. pytest imports this conftest while
collecting this directory, before any test here imports a kernel, so setting the variable here is
enough; it also reaches the worker processes of the training test (they inherit the environment).
The fixture below fails loudly if a kernel module was imported earlier without the interpreter, rather
than letting a test run compiled code that cannot run on CPU tensors.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _triton_interpreter_on_cpu():
    if torch.cuda.is_available():
        return
    early = [
        name for name in sys.modules if name.startswith("megatron_swift_kernels.") and name.endswith("triton_impl")
    ]
    for name in early:
        for value in vars(sys.modules[name]).values():
            if hasattr(value, "fn") and type(value).__name__ == "JITFunction":
                pytest.fail(f"{name} was imported before TRITON_INTERPRET=1 was set: its kernels are compiled")
