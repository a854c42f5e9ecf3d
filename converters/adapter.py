"""LoRA adapters on the HF side: export a trained adapter as a PEFT adapter with HF module names.

Each adapter sits on a megatron-core linear whose weight the family's rule maps to one or more HF
projections. lora_A multiplies the linear's input, which all projections of a fused linear share, so
each projection gets the same A; lora_B's rows are laid out like the weight's rows, so the weight's
own rule splits B exactly (`rule.to_hf` on B as if it were an [out, r] weight). The PEFT adapter
therefore computes exactly what the megatron adapter computes.

Names come from PEFT itself: the adapter's targets are applied to the HF model built on the meta
device (no memory), and every LoRA layer PEFT creates is filled from ours, so the file matches what
`PeftModel.from_pretrained` expects for the installed transformers/PEFT versions. Routed experts that
transformers keeps as 3-D parameters are addressed with PEFT's `target_parameters` (its layout:
lora_A [experts * r, in] expert-major, lora_B [out, r * experts] with the expert index fastest).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from converters.hf_io import CheckpointError
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.models.naming import canonical_name, unwrap_model
from megatron_swift.tuners.lora import LoraConfig, LoraLinear

PEFT_PREFIX = "base_model.model."
_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])$")


def _adapters(chunk) -> list[tuple[str, LoraLinear]]:
    model = unwrap_model(chunk)
    layers = model.decoder.layers
    return [
        (canonical_name(f"{name}.weight", layers).removesuffix(".weight"), module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear)
    ]


def _hf_skeleton(hf_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _short_or_full(adapted: set[str], all_names: set[str], leaf) -> list[str]:
    """PEFT target names: the short leaf names when every such module is adapted, else full paths."""
    targets = []
    for short in sorted({leaf(n) for n in adapted}):
        every = {n for n in all_names if leaf(n) == short}
        targets += [short] if every <= adapted else sorted(n for n in adapted if leaf(n) == short)
    return targets


def peft_adapter_tensors(chunk, args: GPTModelArgs, lora: LoraConfig, hf_config, dtype: torch.dtype | None = None):
    """(PEFT LoraConfig, {key: tensor}) for the adapters of an unsharded model chunk."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    skeleton = _hf_skeleton(hf_config)
    modules = dict(skeleton.named_modules())
    linear_sources: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # HF module -> (A, B)
    param_sources: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused = dict(args.family.moe.fused_expert_params) if args.family.moe else {}
    for name, wrapper in _adapters(chunk):
        lora_a, lora_b = wrapper.lora_A.weight.detach(), wrapper.lora_B.weight.detach()
        rule, bindings = args.family.mapping.resolve(f"{name}.weight")
        hf_modules = [n.removesuffix(".weight") for n in rule.hf_names(bindings)]
        if all(m in modules for m in hf_modules):
            for module, part in zip(hf_modules, rule.to_hf(lora_b, args.dims), strict=True):
                linear_sources[module] = (lora_a, part)
            continue
        expert = _EXPERT.match(name)
        if expert is None or expert.group(3) not in fused:
            raise CheckpointError(f"{name}: its HF modules {hf_modules} are not in the HF model; cannot export")
        experts_module = hf_modules[0].rsplit(".", 2)[0]  # model.layers.L.mlp.experts.E.gate_proj -> ...experts
        param_sources.setdefault((experts_module, fused[expert.group(3)]), {})[int(expert.group(2))] = (lora_a, lora_b)

    saved = _modules_to_save(chunk, args)
    linear_names = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    target_modules = _short_or_full(set(linear_sources), linear_names, lambda n: n.rsplit(".", 1)[-1])
    param_names = {f"{n}.{p}" for n, m in modules.items() for p, _ in m.named_parameters(recurse=False)}
    target_parameters = _short_or_full(
        {f"{m}.{p}" for m, p in param_sources}, param_names, lambda n: ".".join(n.rsplit(".", 3)[-2:])
    )
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        # PEFT cannot apply dropout to parameter targets (3-D experts); dropout does not change inference.
        lora_dropout=0.0 if target_parameters else lora.dropout,
        use_rslora=lora.use_rslora,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        modules_to_save=sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in saved}) or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(skeleton, config)
    tensors = {}
    for peft_name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        path = peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(layer, ParamWrapper):
            per_expert = param_sources.pop((path, layer.parameter_name), None)
            if per_expert is None or sorted(per_expert) != list(range(layer.num_experts)):
                raise CheckpointError(f"{path}.{layer.parameter_name}: PEFT adapts all experts; ours has "
                                      f"{sorted(per_expert or {})}")  # fmt: skip
            lora_a = torch.cat([per_expert[e][0] for e in range(layer.num_experts)])
            lora_b = torch.stack([per_expert[e][1] for e in range(layer.num_experts)], dim=-1).flatten(1)
        else:
            lora_a, lora_b = linear_sources.pop(path)
        tensors[f"{peft_name}.lora_A.weight"] = lora_a
        tensors[f"{peft_name}.lora_B.weight"] = lora_b
    tensors.update({PEFT_PREFIX + name: tensor for name, tensor in saved.items()})
    if linear_sources or param_sources:
        # Known case: for MoE models PEFT rewrites every gate_proj/up_proj/down_proj target to the fused
        # expert parameters, so a LoRA on a dense MLP (dense layers, shared experts) has no PEFT form.
        raise CheckpointError(
            f"these adapters have no place in a PEFT adapter for this model: "
            f"{sorted(linear_sources) + sorted(map(str, param_sources))}; PEFT maps gate_proj/up_proj/down_proj "
            "of MoE models to the routed experts. Export with --merge-lora, or train without LoRA on those "
            "modules (lora.target_modules regex)"
        )
    # Projections of one fused linear share lora_A; safetensors stores each key as its own tensor.
    return config, {k: v.to("cpu", dtype or v.dtype).clone() for k, v in tensors.items()}


def _modules_to_save(chunk, args: GPTModelArgs) -> dict[str, torch.Tensor]:
    """HF name -> tensor of every trained-in-full (modules_to_save) parameter."""
    from megatron_swift.models.naming import canonical_parameters

    found = {}
    for name, param, _ in canonical_parameters(chunk):
        if param.requires_grad and not name.endswith(("lora_A.weight", "lora_B.weight")):
            rule, bindings = args.family.mapping.resolve(name)
            found.update(zip(rule.hf_names(bindings), rule.to_hf(param.detach(), args.dims), strict=True))
    return found


def write_peft_adapter(out: Path, config, tensors: dict[str, torch.Tensor], base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    from safetensors.torch import save_file

    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    save_file(tensors, str(Path(out) / "adapter_model.safetensors"), metadata={"format": "pt"})
