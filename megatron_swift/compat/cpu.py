"""CPU compatibility layer for megatron-core: the ONLY place that patches third-party symbols.

megatron-core is written for CUDA. On a CPU-only machine (development, CI) a handful of call
sites touch CUDA unconditionally. Each shim below names the call site it exists for and is the
smallest change that makes that site work on CPU. Every shim is installed by `apply_cpu_shims()`,
which refuses to run when CUDA is available: the GPU path never goes through this module.

`PATCHED_SYMBOLS` lists every (module, attribute) pair we touch; a test asserts each still
exists, so a megatron-core or torch upgrade that renames one fails loudly instead of silently
skipping the shim. `CudaToCpuMode.rewrites` records the call sites the device redirect
rewrote, so a new CUDA-only call in an upgrade shows up in logs (`MSWIFT_LOG_CUDA_REDIRECTS=1`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

from megatron_swift.compat.device_audit import audit_enabled, install_device_audit, note_on_device

logger = logging.getLogger(__name__)

# (module path, attribute) of every symbol replaced by apply_cpu_shims().
PATCHED_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__"),
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"),
    ("megatron.core.transformer.multi_latent_attention", "HAVE_TE"),
)


# (module path, attribute) that megatron-core reads but never defines when Transformer Engine is
# missing; apply_cpu_shims() defines them. A test checks the reading code still names them.
DEFINED_SYMBOLS: tuple[tuple[str, str], ...] = (("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),)

_applied = False
_mode: CudaToCpuMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device in megatron-core always means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU for every torch call made while the mode is active.

    Why: megatron-core hard-codes `device="cuda"` in schedules (total_num_tokens), optimizer,
    clip_grads and get_default_causal_mask, calls `.cuda()` for tied embeddings on the last
    pipeline stage, and asserts `tensor.type() == "torch.cuda.FloatTensor"` in clip_grads and the
    distributed optimizer. Context parallelism builds index tensors with `pin_memory=True`
    (rope_utils.get_pos_emb_on_this_cp_rank), which needs an accelerator's allocator; pinning only
    speeds up host-to-device copies, so on CPU it is dropped. One mode covers all of them without
    touching each file.
    """

    def __init__(self):
        super().__init__()
        self.rewrites: set[str] = set()
        self._log = os.environ.get("MSWIFT_LOG_CUDA_REDIRECTS") == "1"
        self._audit = audit_enabled()

    def _record(self, what: str) -> None:
        if not self._log:
            return
        frame = traceback.extract_stack(limit=4)[0]
        site = f"{what} at {frame.filename}:{frame.lineno}"
        if site not in self.rewrites:
            self.rewrites.add(site)
            logger.info("cpu shim: rewrote %s", site)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            self._record("Tensor.cuda()")
            return self._placed(args[0])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            cpu_type = func(*args)
            return cpu_type.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else cpu_type
        redirected = False
        if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args):
            args, redirected = tuple("cpu" if _is_cuda_device(a) else a for a in args), True
        if kwargs.get("pin_memory"):
            self._record(f"pin_memory=True in {getattr(func, '__name__', func)}")
            kwargs = {**kwargs, "pin_memory": False}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            self._record(f"device=cuda in {getattr(func, '__name__', func)}")
            kwargs, redirected = {**kwargs, "device": "cpu"}, True
        result = func(*args, **kwargs)
        return self._placed(result) if redirected else result

    def _placed(self, result):
        """What a CUDA run would have on the GPU; the device audit records it (compat/device_audit.py)."""
        return note_on_device(result) if self._audit else result


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _allow_sequence_parallel(original_new):
    """WrappedTorchNorm.__new__ asserts `not config.sequence_parallel`.

    Why: under sequence parallelism a norm is numerically the same per token; what SP needs is
    that the norm's weight gradient is all-reduced over the TP group. We build the norm with SP off
    and tag its parameters `sequence_parallel=True`, which is exactly what
    `finalize_model_grads` looks for to do that reduction. Patching `__new__` (not the module
    attribute) reaches every alias: gpt_layer_specs.LNImpl and transformer_block.LayerNormImpl.
    """

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = original_new(cls, config_without_sp, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's `local_multi_tensor_l2_norm`, bitwise: the norm of the per-tensor L2 norms as a [1] fp32 tensor.

    One foreach call instead of a Python loop and a host round trip.
    """
    if not tensor_lists[0]:
        return torch.zeros(1), None
    per_tensor_norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(per_tensor_norms).float()).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's `local_multi_tensor_scale` (dst = src * scale) as foreach calls; bitwise the same result."""
    src, dst = tensor_lists
    if not src:  # e.g. a pipeline stage without trainable parameters; foreach ops refuse empty lists
        return
    if all(a is b for a, b in zip(src, dst, strict=True)):  # clip_grads scales the gradients in place
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


# Where megatron-core binds its no-Apex/TE multi-tensor fallback (named in megatron.core.utils), and
# what replaces it (shim 3c).
_MULTI_TENSOR_SITES = (
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "local_multi_tensor_l2_norm", foreach_l2_norm),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl", "local_multi_tensor_scale", foreach_scale),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", "local_multi_tensor_scale", foreach_scale),
)


def apply_cpu_shims() -> None:
    """Install every CPU shim and enter the device redirect (idempotent; init_distributed calls it, and
    destroy_distributed leaves the redirect with `leave_device_redirect`). Raises if CUDA is available."""
    global _applied, _mode
    if _applied:
        _enter_device_redirect()
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shims() called on a machine with CUDA: the GPU path must not be patched")

    # 1. RNG: CudaRNGStatesTracker.add/fork (model_parallel_cuda_manual_seed) save and restore
    #    CUDA generator states. Map them to the CPU default generator, which is what CPU dropout
    #    draws from, so per-TP-rank dropout streams keep their meaning.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _cpu_get_rng_state
    random_mod._set_cuda_rng_state = _cpu_set_rng_state

    # 2. GlobalMemoryBuffer.get_tensor (used by DotProductAttention) allocates on
    #    torch.cuda.current_device(); other sites pass it as `device=`. "cpu" is valid for both.
    torch.cuda.current_device = lambda: "cpu"

    # 2b. dist_checkpointing's FileSystemWriterAsync.preload_tensors (every checkpoint save) calls
    #     torch.cuda.synchronize(); with no device queue there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None

    # 3. The torch norm used without Apex/TE refuses sequence parallel (see the factory's docstring).
    norm_cls = importlib.import_module("megatron.core.transformer.torch_norm").WrappedTorchNorm
    norm_cls.__new__ = _allow_sequence_parallel(norm_cls.__new__)

    # 3b. megatron-core 0.16 moe_utils imports te_general_gemm only inside `try: import TE`, but
    #     RouterGatingLinearFunction tests `te_general_gemm is not None` unconditionally: without TE
    #     every MoE router raises NameError. None selects its plain torch.mm path.
    for module_path, name in DEFINED_SYMBOLS:
        module = importlib.import_module(module_path)
        if not hasattr(module, name):
            setattr(module, name, None)

    # 3b'. megatron-core 0.16's multi_latent_attention sets HAVE_TE when its TE extension module imports,
    #      which it does without Transformer Engine, binding TELinear to a MagicMock placeholder; then
    #      MultiLatentAttention.__init__ calls `isinstance(self.linear_proj, TELinear)` and every MLA layer
    #      raises TypeError. Without TE the flag is false (that check only concerns TE's FP8 linears).
    if not _has_transformer_engine():
        importlib.import_module("megatron.core.transformer.multi_latent_attention").HAVE_TE = False

    # 3c. Without Apex/TE, megatron-core's gradient clipping (every step) computes the gradient norm and
    #    scales the gradients with Python loops: one op, a temporary and a host round trip per tensor
    #    (utils.local_multi_tensor_l2_norm / local_multi_tensor_scale). torch's foreach ops do the same
    #    arithmetic in one call each. Replaced only where megatron bound its own fallback.
    utils_mod = importlib.import_module("megatron.core.utils")
    for module_path, name, fallback, replacement in _MULTI_TENSOR_SITES:
        module = importlib.import_module(module_path)
        if getattr(module, name) is getattr(utils_mod, fallback):
            setattr(module, name, replacement)

    # 4. + 5. Hard-coded CUDA placement and `.type()` string checks: one TorchFunctionMode.
    _mode = CudaToCpuMode()
    _enter_device_redirect()
    # 6. Tests only (MSWIFT_DEVICE_AUDIT=1): our collectives must get what a CUDA run has on the GPU.
    if audit_enabled():
        install_device_audit()
    _applied = True


def _has_transformer_engine() -> bool:
    from megatron_swift._optional import has_transformer_engine

    return has_transformer_engine()


def cpu_shims_applied() -> bool:
    """Whether this process installed the CPU shims (never true on a GPU run: a check for the GPU path)."""
    return _applied


def _redirect_active() -> bool:
    return _mode is not None and _mode in torch.overrides._get_current_function_mode_stack()


def _enter_device_redirect() -> None:
    if _mode is not None and not _redirect_active():
        _mode.__enter__()


def leave_device_redirect() -> None:
    """Leave the device redirect (destroy_distributed calls it): torch calls made after a run's megatron-core
    work no longer pay the mode's Python dispatch. The symbol shims stay: they only replace CUDA-only calls."""
    if _mode is not None and torch.overrides._get_current_function_mode() is _mode:
        _mode.__exit__(None, None, None)


@contextlib.contextmanager
def device_redirect_suspended():
    """Runs the body without the device-redirect mode (the other shims only replace CUDA-only symbols).

    For code that never calls megatron-core timed next to code that does, e.g. the HF reference step of
    benchmarks/: under the mode each of its torch calls would also pay the mode's Python dispatch.
    """
    if _mode is None or torch.overrides._get_current_function_mode() is not _mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def cuda_redirects() -> set[str]:
    """Call sites rewritten so far (populated when MSWIFT_LOG_CUDA_REDIRECTS=1)."""
    return set(_mode.rewrites) if _mode else set()
