"""Acceptance 3: training with the Triton kernels (interpreted on CPU) gives the torch kernels' losses.

Also: the fused linear + cross-entropy loss trains like the logits path, the kernel choice leaves the
checkpoint layout unchanged, and an unavailable choice is a clear error before anything runs.
"""

from __future__ import annotations

import pytest
import torch

from megatron_swift.config import ConfigError
from megatron_swift.training.job import check_job
from megatron_swift_kernels.select import KernelUnavailableError, resolve
from tests.train_matrix import job_for, run_cases

DATA = "examples/data/sft_sample.jsonl"
REL_TOL = 1e-5
TORCH = {"kernels": "torch"}
TRITON_FUSED = {"kernels": "triton", "fused_linear_cross_entropy": True}
TORCH_FUSED = {"kernels": "torch", "fused_linear_cross_entropy": True}


def _worst(losses, expected):
    assert len(losses) == len(expected) == 3
    return max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True))


def test_triton_kernels_and_fused_loss_train_like_torch_kernels(tiny_models, tmp_path):
    """3 steps of 4 samples, fp32: every Triton kernel the model uses runs in the interpreter."""
    models = [{"kernels": "triton"}, TORCH_FUSED, TRITON_FUSED]
    cases = [(tiny_models["llama"], {}, {}, None, model) for model in [TORCH, *models]]
    torch_losses, *others = run_cases(cases, DATA, tmp_path, world_size=1)
    for model, losses in zip(models, others, strict=True):
        assert _worst(losses, torch_losses) <= REL_TOL, (model, losses, torch_losses)
    assert torch_losses[-1] < torch_losses[0]


@pytest.mark.slow
def test_triton_kernels_and_fused_loss_at_tp2_and_sequence_parallel(tiny_models, tmp_path):
    """Vocab-parallel fused loss and the norm's sequence-parallel weight gradient in a real model."""
    llama = tiny_models["llama"]
    (reference,) = run_cases([(llama, {}, {}, None, TORCH)], DATA, tmp_path / "ref", world_size=1)
    layouts = [{"tensor_model_parallel_size": 2}, {"tensor_model_parallel_size": 2, "sequence_parallel": True}]
    cases = [(llama, layout, {}, None, TRITON_FUSED) for layout in layouts]
    for layout, losses in zip(layouts, run_cases(cases, DATA, tmp_path / "tp2", world_size=2), strict=True):
        assert _worst(losses, reference) <= REL_TOL, (layout, losses, reference)


def test_state_dict_keys_do_not_depend_on_the_kernels(tiny_models, tmp_path):
    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.models import build_model_chunks, transformer_config, translate
    from megatron_swift.models.kernel_modules import KernelMLP, KernelRMSNorm

    args = translate(load_hf_config(tiny_models["qwen3"]))
    init_distributed(ParallelConfig())
    try:
        config = transformer_config(args, ParallelConfig())
        stock = build_model_chunks(args, config, spec="local")[0]
        ours = build_model_chunks(args, config, spec="local", kernels="triton", fused_linear_cross_entropy=True)[0]
        assert list(ours.state_dict()) == list(stock.state_dict())
        # What dist_checkpointing writes (training checkpoints): same keys and global shapes.
        ours_sharded, stock_sharded = ours.sharded_state_dict(), stock.sharded_state_dict()
        assert ours_sharded.keys() == stock_sharded.keys()
        assert all(
            getattr(ours_sharded[k], "global_shape", None) == getattr(stock_sharded[k], "global_shape", None)
            for k in stock_sharded
        )
        kinds = {type(module) for module in ours.modules()}
        assert {KernelRMSNorm, KernelMLP} <= kinds  # qwen3: also the q/k norms
        assert torch.nn.RMSNorm not in kinds  # every megatron torch norm was replaced
    finally:
        destroy_distributed()


def test_unavailable_choice_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    with pytest.raises(KernelUnavailableError, match="Transformer Engine provides no swiglu"):
        resolve("swiglu", "te")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
            resolve("rmsnorm", "triton")
        assert resolve("rmsnorm", "auto") == "torch"
    job = job_for(str(tiny_models["llama"]), DATA, str(tmp_path), {}, {}, kernels="te", spec="local")
    with pytest.raises(ConfigError, match=r"model\.kernels=te comes with the Transformer Engine layer spec"):
        check_job(job, 1)
