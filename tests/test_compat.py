"""The CPU shims: every patched symbol still exists upstream, and each shim does its one job."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_swift.compat import DEFINED_SYMBOLS, PATCHED_SYMBOLS, apply_cpu_shims, device_redirect_suspended

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are never applied with CUDA")

_CHECK_UNPATCHED = """
import importlib, sys
missing = []
for module, attr in {patched!r}:
    obj = importlib.import_module(module)
    for part in attr.split("."):
        if not hasattr(obj, part):
            missing.append(f"{{module}}.{{attr}}")
            break
        obj = getattr(obj, part)
from megatron.core.transformer.moe.moe_utils import RouterGatingLinearFunction
names = RouterGatingLinearFunction.forward.__code__.co_names
for module, attr in {defined!r}:
    if attr not in names:
        missing.append(f"{{module}}.{{attr}} is no longer read by RouterGatingLinearFunction")
print("\\n".join(missing))
sys.exit(1 if missing else 0)
"""


def test_patched_symbols_exist_in_unpatched_libraries():
    # A fresh interpreter: this process may already have applied the shims.
    code = _CHECK_UNPATCHED.format(patched=PATCHED_SYMBOLS, defined=DEFINED_SYMBOLS)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"symbols the CPU shims patch are gone:\n{result.stdout}{result.stderr}"


def test_device_redirect_and_type_strings():
    apply_cpu_shims()
    tensor = torch.empty(3, device="cuda")
    assert tensor.device.type == "cpu"
    assert tensor.cuda() is tensor
    assert tensor.to("cuda").device.type == "cpu"
    assert tensor.type() == "torch.cuda.FloatTensor"  # megatron's clip_grads / distributed optimizer check this
    assert torch.cuda.current_device() == "cpu"


def test_device_redirect_can_be_suspended_for_code_outside_megatron():
    apply_cpu_shims()
    with device_redirect_suspended():
        with pytest.raises((RuntimeError, AssertionError)):  # no CUDA on this machine, and nothing redirects
            torch.empty(3, device="cuda")
        assert torch.empty(3).type() == "torch.FloatTensor"
    assert torch.empty(3, device="cuda").device.type == "cpu"  # the mode is back


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mp_random

    apply_cpu_shims()
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(0)
    tracker.add("shim-test", 1234)
    outside_before = torch.get_rng_state()
    with tracker.fork("shim-test"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched
    with tracker.fork("shim-test"):
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the tracked stream advanced
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(4), first)
    tracker.reset()


def test_torch_norm_accepts_sequence_parallel_and_tags_params():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    apply_cpu_shims()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization="RMSNorm",
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        use_cpu_initialization=True,
    )
    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert config.sequence_parallel  # the caller's config is not mutated


_LOG_REDIRECTS = """
import torch
from megatron_swift.compat import apply_cpu_shims, cuda_redirects
apply_cpu_shims()
torch.empty(2, device="cuda")
sites = cuda_redirects()
assert any("device=cuda in empty" in s for s in sites), sites
"""


def test_redirected_cuda_call_sites_are_logged_when_asked():
    result = subprocess.run([sys.executable, "-c", _LOG_REDIRECTS], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MSWIFT_LOG_CUDA_REDIRECTS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_gpu_extras_name_what_to_install():
    from megatron_swift._optional import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"vllm is not usable .*pip install 'megatron-swift\[serve\]'"):
        require("vllm")
