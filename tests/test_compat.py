"""The compatibility layer: every patched symbol still exists upstream, and each shim does its one job."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_swift.compat import (
    CHECKPOINT_WRITER_SYMBOLS,
    DEFINED_SYMBOLS,
    DEVICE_AUDIT_SYMBOLS,
    FULLY_RESHARDABLE_SYMBOLS,
    PATCHED_SYMBOLS,
    UPSTREAM_INTERNALS,
    apply_cpu_shims,
    device_redirect_suspended,
)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are never applied with CUDA")

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


@cpu_only
def test_patched_symbols_exist_in_unpatched_libraries():
    # A fresh interpreter: this process may already have applied the shims.
    code = _CHECK_UNPATCHED.format(patched=PATCHED_SYMBOLS, defined=DEFINED_SYMBOLS)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"symbols the CPU shims patch are gone:\n{result.stdout}{result.stderr}"


@cpu_only
def test_device_redirect_and_type_strings():
    apply_cpu_shims()
    tensor = torch.empty(3, device="cuda")
    assert tensor.device.type == "cpu"
    assert tensor.cuda() is tensor
    assert tensor.to("cuda").device.type == "cpu"
    assert tensor.type() == "torch.cuda.FloatTensor"  # megatron's clip_grads / distributed optimizer check this
    assert torch.cuda.current_device() == "cpu"


@cpu_only
def test_device_redirect_can_be_suspended_for_code_outside_megatron():
    apply_cpu_shims()
    with device_redirect_suspended():
        with pytest.raises((RuntimeError, AssertionError)):  # no CUDA on this machine, and nothing redirects
            torch.empty(3, device="cuda")
        assert torch.empty(3).type() == "torch.FloatTensor"
    assert torch.empty(3, device="cuda").device.type == "cpu"  # the mode is back


@cpu_only
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


@cpu_only
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


@cpu_only
def test_multi_tensor_fallbacks_are_replaced_by_bitwise_equal_foreach_ops():
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer_mod
    from megatron.core import utils

    from megatron_swift.compat.cpu import foreach_l2_norm, foreach_scale

    apply_cpu_shims()
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale
    assert optimizer_mod.multi_tensor_scale_impl is foreach_scale

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * 3 for shape in [(7, 5), (300,), (2, 3, 4), (1,)]]
    theirs, _ = utils.local_multi_tensor_l2_norm(0, None, [grads], False)
    ours, _ = foreach_l2_norm(0, None, [grads], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)

    in_place_theirs, in_place_ours = [g.clone() for g in grads], [g.clone() for g in grads]
    utils.local_multi_tensor_scale(0, None, [in_place_theirs, in_place_theirs], 0.37)
    foreach_scale(0, None, [in_place_ours, in_place_ours], 0.37)  # how clip_grads calls it
    assert all(torch.equal(a, b) for a, b in zip(in_place_ours, in_place_theirs, strict=True))

    copies_theirs = [torch.empty_like(g, dtype=torch.bfloat16) for g in grads]  # fp32 -> bf16, as the fp16 optimizer
    copies_ours = [torch.empty_like(g, dtype=torch.bfloat16) for g in grads]
    utils.local_multi_tensor_scale(0, None, [grads, copies_theirs], 1.0)
    foreach_scale(0, None, [grads, copies_ours], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(copies_ours, copies_theirs, strict=True))

    # A rank without gradients (a pipeline stage with nothing trainable) calls them with empty lists.
    foreach_scale(0, None, [[], []], 0.5)
    empty_norm = utils.local_multi_tensor_l2_norm(0, None, [[]], False)[0]
    assert torch.equal(foreach_l2_norm(0, None, [[]], False)[0], empty_norm)


_LOG_REDIRECTS = """
import torch
from megatron_swift.compat import apply_cpu_shims, cuda_redirects
apply_cpu_shims()
torch.empty(2, device="cuda")
sites = cuda_redirects()
assert any("device=cuda in empty" in s for s in sites), sites
"""


@cpu_only
def test_redirected_cuda_call_sites_are_logged_when_asked():
    result = subprocess.run([sys.executable, "-c", _LOG_REDIRECTS], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MSWIFT_LOG_CUDA_REDIRECTS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


@cpu_only
def test_missing_gpu_extras_name_what_to_install():
    from megatron_swift._optional import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"vllm is not usable .*pip install 'megatron-swift\[serve\]'"):
        require("vllm")


def test_checkpoint_writer_and_device_audit_symbols_exist_and_no_manager_process_starts():
    """The writer patch is applied on every machine: megatron-core's writer must find an in-process queue, not
    start a Manager. The device audit (tests) wraps torch.distributed's tensor collectives."""
    import multiprocessing
    import queue

    code = _CHECK_UNPATCHED.format(patched=CHECKPOINT_WRITER_SYMBOLS + DEVICE_AUDIT_SYMBOLS, defined=())
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"symbols the writer patch or the device audit touch are gone:\n{result.stdout}"
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_swift.compat import keep_checkpoint_writer_in_process

    before = set(multiprocessing.active_children())  # what earlier tests in this process left running
    keep_checkpoint_writer_in_process()
    assert isinstance(filesystem_async._get_write_results_queue(), queue.Queue)
    assert set(multiprocessing.active_children()) <= before


def test_fully_reshardable_range_fix_applies_exactly_until_megatron_has_it():
    """compat/distrib_optimizer.py shifts the ranges megatron's fully_reshardable save cuts by while megatron's code
    slices by the padded ranges, and stays out once it holds upstream's fix; what it reads still exists."""
    import importlib
    import inspect
    from types import SimpleNamespace

    from megatron_swift.compat import compact_param_index_maps
    from megatron_swift.compat.distrib_optimizer import PADDED_SLICE, UPSTREAM_FIX, slices_padded_ranges

    for module, path in FULLY_RESHARDABLE_SYMBOLS:
        obj = importlib.import_module(module)
        for part in path.split("."):
            assert hasattr(obj, part), f"{module}.{path} is gone; look at compat/distrib_optimizer.py"
            obj = getattr(obj, part)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    source = inspect.getsource(DistributedOptimizer.sharded_param_state_fully_reshardable)
    assert (PADDED_SLICE in source) != (UPSTREAM_FIX in source), "neither the known bug nor upstream's fix"
    assert slices_padded_ranges() == (PADDED_SLICE in source)
    # Buckets of 256 / 128 / 64 elements holding 200 / 100 / 16 (the rest is end padding).
    buckets = [
        SimpleNamespace(grad_data=torch.empty(n), numel_unpadded=u) for n, u in ((256, 200), (128, 100), (64, 16))
    ]
    index_map = {"a": (0, 200, 0), "b": (256, 356, 1), "c": (384, 400, 2)}
    buffer = SimpleNamespace(buckets=buckets, param_index_map=index_map)
    with compact_param_index_maps([SimpleNamespace(buffers=[buffer])]):
        compact = {"a": (0, 200, 0), "b": (200, 300, 1), "c": (300, 316, 2)}
        assert buffer.param_index_map == (compact if slices_padded_ranges() else index_map)
    assert buffer.param_index_map is index_map


@pytest.mark.parametrize(
    ("module", "path", "fragment", "user"), UPSTREAM_INTERNALS, ids=[i[1] for i in UPSTREAM_INTERNALS]
)
def test_megatron_internals_we_rely_on_are_still_there(module, path, fragment, user):
    import importlib
    import inspect

    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), f"{module}.{path} is gone; look at {user}"
        obj = getattr(obj, part)
    if fragment is not None:
        assert fragment in inspect.getsource(obj), f"{module}.{path} no longer holds {fragment!r}; look at {user}"


@cpu_only
def test_device_redirect_is_left_on_destroy():
    """The redirect mode is entered by init_distributed and left by destroy_distributed (scoped, not process-wide)."""
    import torch.overrides

    from megatron_swift.compat.cpu import CudaToCpuMode
    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed

    def active() -> bool:
        return any(isinstance(mode, CudaToCpuMode) for mode in torch.overrides._get_current_function_mode_stack())

    init_distributed(ParallelConfig())
    assert active() and torch.zeros(1, device="cuda").device.type == "cpu"
    destroy_distributed()
    assert not active()
    init_distributed(ParallelConfig())
    assert active()
    destroy_distributed()
