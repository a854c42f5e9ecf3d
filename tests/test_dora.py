"""DoRA (lora.use_dora) against HF PEFT's DoRA as the oracle: logits before and after a training step, the
PEFT adapter both ways, refusals. Layout parity, merged export and resume are batched with the LoRA tests
in tests/test_lora.py."""

import re

import pytest
import torch

from tests.train_matrix import job_for

DATA = "examples/data/sft_sample.jsonl"
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def peft_dora_model(hf_dir, seed: int):
    """HF + PEFT DoRA, random lora_B (and so a magnitude that is not the plain weight norm), magnitudes perturbed
    (m / ||W + s B A|| is not 1: the norm counts from the first step), and lora_A tied across the projections
    megatron-core fuses (ours shares one there)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, use_dora=True, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), config)
    for layer in model.base_model.model.model.layers:
        parents = {"q_proj": layer.self_attn, "gate_proj": layer.mlp}
        for group in FUSED:
            parent = parents[group[0]]
            shared = getattr(parent, group[0]).lora_A["default"]
            for name in group[1:]:
                getattr(parent, name).lora_A["default"] = shared
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape))
    return model


def _batch():
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _loss(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _step(params, logits_fn, tokens):
    optimizer = torch.optim.Adam(params, lr=1e-2)
    _loss(logits_fn(), tokens).backward()
    optimizer.step()


def test_dora_matches_peft_before_and_after_a_training_step(tiny_models, tmp_path):
    """A PEFT DoRA adapter read into megatron-core gives PEFT's logits (1e-4, fp32); one Adam step on both
    sides on the same batch keeps them equal; our exported adapter loads in PEFT with the stepped logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.checkpoint.peft import peft_adapter_tensors, write_peft_adapter
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.tuners.lora import LoraLinear

    hf_dir = tiny_models["llama"]
    peft_model = peft_dora_model(hf_dir, seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    tokens, positions = _batch()

    lora = {"rank": 4, "alpha": 8.0, "use_dora": True, "adapter": str(tmp_path / "peft")}
    job = job_for(str(hf_dir), DATA, str(tmp_path / "out"), {}, {}, lora)
    args = check_job(job, 1)
    init_distributed(job.parallel)
    try:
        chunks = build_model(job, args)
        model = chunks[0]
        wrappers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert len(wrappers) == 4 * args.transformer["num_layers"] and all(
            w.lora_magnitude_vector is not None for w in wrappers
        )

        def ours():
            return model(tokens, positions, None)[..., : args.vocab_size]

        def theirs():
            return peft_model(tokens).logits

        model.train(), peft_model.train()
        with torch.no_grad():
            before = ours(), theirs()
        base_logits = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits.detach()
        _step([p for p in model.parameters() if p.requires_grad], ours, tokens)
        _step([p for p in peft_model.parameters() if p.requires_grad], theirs, tokens)
        model.eval(), peft_model.eval()
        with torch.no_grad():
            after = ours(), theirs()
        config, tensors = peft_adapter_tensors(model, args, job.lora, load_hf_config(hf_dir))
        write_peft_adapter(tmp_path / "exported", config, tensors, str(hf_dir))
    finally:
        destroy_distributed()
    assert (before[0] - before[1]).abs().max() <= 1e-4
    assert (after[0] - after[1]).abs().max() <= 1e-4
    assert (after[1] - before[1]).abs().max() > 1e-2  # the step moved the model: the second check has teeth
    assert (before[1] - base_logits).abs().max() > 1e-2
    assert config.use_dora and sum("lora_magnitude_vector" in k for k in tensors) == 7 * args.transformer["num_layers"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                         tmp_path / "exported")  # fmt: skip
    with torch.no_grad():
        assert (reloaded(tokens).logits - after[1]).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["column", "row"])
def test_dora_dropout_branch_matches_a_peft_layer(mode):
    """In training with dropout PEFT computes W x from the dropped input (its second branch). One megatron-core
    linear with a bias (added inside the column-parallel one, returned by the row-parallel one) and our DoRA
    wrapper vs a PEFT DoRA nn.Linear holding the same tensors: outputs and every gradient (input, A, B,
    magnitude) agree, both sides drawing the one dropout mask from the same seed; and so do eval outputs."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from peft import LoraConfig, get_peft_model

    from megatron_swift.config import ParallelConfig
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.tuners.lora import LoraLinear

    hidden, out, rank = 16, 24, 4
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(out, hidden, generator=generator), torch.randn(out, generator=generator)
    lora_a, lora_b = torch.randn(rank, hidden, generator=generator), torch.randn(out, rank, generator=generator)
    magnitude = torch.rand(out, generator=generator) + 0.5
    x = torch.randn(5, 2, hidden, generator=generator)

    reference = torch.nn.Sequential(torch.nn.Linear(hidden, out))
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.3)
    reference = get_peft_model(reference, config).base_model.model[0]
    with torch.no_grad():
        reference.base_layer.weight.copy_(weight), reference.base_layer.bias.copy_(bias)
        reference.lora_A["default"].weight.copy_(lora_a), reference.lora_B["default"].weight.copy_(lora_b)
        reference.lora_magnitude_vector["default"].weight.copy_(magnitude)

    init_distributed(ParallelConfig())
    try:
        cls = ColumnParallelLinear if mode == "column" else RowParallelLinear
        kwargs = {"gather_output": False} if mode == "column" else {"input_is_parallel": True}
        base = cls(hidden, out, config=TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1),
                   init_method=torch.nn.init.zeros_, bias=True, skip_bias_add=mode == "row", **kwargs)  # fmt: skip
        with torch.no_grad():
            base.weight.copy_(weight), base.bias.copy_(bias)
        base.weight.requires_grad = base.bias.requires_grad = False
        ours = LoraLinear(base, lora_a, lora_b, scale=2.0, dropout=0.3, use_dora=True, magnitude=magnitude)
        ours_params = (ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector)
        theirs_params = (reference.lora_A["default"].weight, reference.lora_B["default"].weight,
                         reference.lora_magnitude_vector["default"].weight)  # fmt: skip
        results = []
        for layer, forward, params in ((ours, lambda x: sum(t for t in ours(x) if t is not None), ours_params),
                                       (reference, reference, theirs_params)):  # fmt: skip
            layer.train()
            x_grad = x.clone().requires_grad_()
            torch.manual_seed(11)
            output = forward(x_grad)
            output.square().sum().backward()
            results.append([output.detach(), x_grad.grad, *(p.grad for p in params)])
        with torch.no_grad():  # in eval the other branch: W x is the base output less the bias the layer added
            ours_eval = sum(t for t in ours.eval()(x) if t is not None)
    finally:
        destroy_distributed()
    with torch.no_grad():
        undropped = reference.eval()(x)
    assert (ours_eval - undropped).abs().max() <= 1e-5 * undropped.abs().max()
    assert (results[1][0] - undropped).abs().max() > 1e-1  # dropout was on: the training branch ran
    for ours_value, theirs_value in zip(results[0], results[1], strict=True):
        assert (ours_value - theirs_value).abs().max() <= 1e-5 * theirs_value.abs().max()


@pytest.mark.parametrize(
    ("family", "lora", "message"),
    [
        ("qwen3_moe", {"use_dora": True}, "lora.target_modules all-linear reaches them"),  # preflight
        (
            "qwen3_moe",
            {"use_dora": True, "target_modules": [r"re:linear_fc1$"]},
            "lora.use_dora: DoRA on routed-expert",
        ),
        ("llama", {"use_dora": True, "adapter": "PEFT_LORA"}, "lora.use_dora=True but the adapter has use_dora=False"),
    ],
)
def test_dora_refusals_name_the_field(tiny_models, tmp_path, family, lora, message):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_swift.checkpoint.hf import CheckpointError
    from megatron_swift.config import ConfigError
    from megatron_swift.distributed import destroy_distributed, init_distributed
    from megatron_swift.training.job import build_model, check_job
    from megatron_swift.tuners.lora.layers import LoraError

    if lora.get("adapter") == "PEFT_LORA":
        model = AutoModelForCausalLM.from_pretrained(tiny_models[family])
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS)).save_pretrained(tmp_path)
        lora = {**lora, "adapter": str(tmp_path)}
    job = job_for(str(tiny_models[family]), DATA, str(tmp_path / "out"), {}, {}, {"rank": 4, "alpha": 8.0, **lora})
    with pytest.raises((ConfigError, CheckpointError, LoraError), match=re.escape(message)):
        args = check_job(job, 1)
        init_distributed(job.parallel)
        try:
            build_model(job, args)
        finally:
            destroy_distributed()
