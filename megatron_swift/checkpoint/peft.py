"""LoRA adapters on the HF side: PEFT adapters out (export) and in (continue training), HF module names.

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

Import is the inverse. A PEFT adapter trained on HF usually has a different lora_A per projection of
a fused linear; it is then taken in exactly as one adapter of rank k*r (A stacked, B block-diagonal,
same scale), which computes the same output, and exported back with PEFT's `rank_pattern` /
`alpha_pattern` for those modules.

DoRA (`use_dora: true`): the magnitude has one entry per output row, and each row of a fused linear
belongs to one projection, whose row norms of W + s B A are the same whether lora_A is shared or
per projection; so the weight's rule splits it exactly like B (`lora_magnitude_vector` per projection).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import torch

from megatron_swift.checkpoint.hf import CheckpointError
from megatron_swift.models.hf_config import GPTModelArgs
from megatron_swift.models.naming import canonical_name, unwrap_model
from megatron_swift.tuners.lora import LoraConfig, LoraLinear
from megatron_swift.tuners.lora.layers import ADAPTER_KEYS, MAGNITUDE

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


def _hf_skeleton(hf_config, args: GPTModelArgs, reward_model: bool = False):
    """The HF model on the meta device: a causal LM, the reward model (`*ForSequenceClassification`), or a
    vision-language model's own class (its module names are transformers', e.g. `model.language_model.layers.*`)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if args.vision is not None:
            return getattr(transformers, args.family.architectures[0])._from_config(hf_config)
        auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
        return auto.from_config(hf_config)


def _peft_lora_layers(skeleton, peft_config):
    """(PEFT module name, HF path of what it adapts, layer) for every LoRA layer PEFT puts on `skeleton`."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    # A copy: PEFT adds its task's modules_to_save to the config it is given (SEQ_CLS: classifier, score).
    for peft_name, layer in get_peft_model(skeleton, copy.deepcopy(peft_config)).named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            yield peft_name, peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer", ""), layer


def _fused_expert_params(args: GPTModelArgs) -> dict[str, str]:
    return dict(args.family.moe.fused_expert_params) if args.family.moe else {}


def _to_peft_experts(per_expert: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (A [r, in], B [out, r]) -> PEFT's 3-D parameter layout (see the module docstring)."""
    return torch.cat([a for a, _ in per_expert]), torch.stack([b for _, b in per_expert], dim=-1).flatten(1)


def _from_peft_experts(lora_a, lora_b, experts: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `index`'s (A, B) from PEFT's 3-D parameter layout: the inverse of `_to_peft_experts`."""
    rank = lora_a.shape[0] // experts
    return lora_a.reshape(experts, rank, -1)[index], lora_b.reshape(lora_b.shape[0], rank, experts)[..., index]


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
    from peft.tuners.lora.layer import ParamWrapper

    skeleton = _hf_skeleton(hf_config, args, args.reward_head)
    # PEFT addresses the skeleton's modules, which a family may name otherwise than its rules (mapping.py hf_aliases).
    modules = dict(skeleton.named_modules())
    module_of = {args.mapping.rules_name(name): name for name in modules}
    linear_sources: dict[str, tuple] = {}  # HF module -> (A, B, DoRA magnitude or None)
    param_sources: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused = _fused_expert_params(args)
    for name, wrapper in _adapters(chunk):
        lora_a, lora_b = wrapper.lora_A.weight.detach(), wrapper.lora_B.weight.detach()
        rule, bindings = args.mapping.resolve(f"{name}.weight")
        hf_modules = [n.removesuffix(".weight") for n in rule.hf_names(bindings)]
        hf_modules = [module_of.get(m, m) for m in hf_modules]
        if all(m in modules for m in hf_modules):
            magnitude = wrapper.lora_magnitude_vector
            magnitudes = (
                rule.to_hf(magnitude.detach(), args.dims) if magnitude is not None else [None] * len(hf_modules)
            )
            for module, part, mag in zip(hf_modules, rule.to_hf(lora_b, args.dims), magnitudes, strict=True):
                linear_sources[module] = (lora_a, part, mag)
            continue
        expert = _EXPERT.match(name)
        if expert is None or expert.group(3) not in fused:
            raise CheckpointError(f"{name}: its HF modules {hf_modules} are not in the HF model; cannot export")
        experts_module = hf_modules[0].rsplit(".", 2)[0]  # model.layers.L.mlp.experts.E.gate_proj -> ...experts
        param_sources.setdefault((experts_module, fused[expert.group(3)]), {})[int(expert.group(2))] = (lora_a, lora_b)

    saved = {}
    for name, tensor in _modules_to_save(chunk, args).items():
        module, _, leaf = name.rpartition(".")
        saved[f"{module_of.get(module, module)}.{leaf}"] = tensor
    rank_pattern, alpha_pattern = {}, {}
    for module, (lora_a, *_) in linear_sources.items():
        if lora_a.shape[0] != lora.rank:  # an imported adapter stacked over fused projections (see above)
            rank_pattern[re.escape(module)] = lora_a.shape[0]
            alpha_pattern[re.escape(module)] = _alpha_for_rank(lora, lora_a.shape[0])
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
        use_dora=lora.use_dora,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        modules_to_save=sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in saved}) or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        # A reward model's: PEFT's sequence classification, which trains and saves the head (modules_to_save).
        task_type="SEQ_CLS" if args.reward_head else "CAUSAL_LM",
    )
    tensors = {}
    for peft_name, path, layer in _peft_lora_layers(skeleton, config):
        if isinstance(layer, ParamWrapper):
            per_expert = param_sources.pop((path, layer.parameter_name), None)
            if per_expert is None or sorted(per_expert) != list(range(layer.num_experts)):
                raise CheckpointError(f"{path}.{layer.parameter_name}: PEFT adapts all experts; ours has "
                                      f"{sorted(per_expert or {})}")  # fmt: skip
            lora_a, lora_b = _to_peft_experts([per_expert[e] for e in range(layer.num_experts)])
        else:
            lora_a, lora_b, magnitude = linear_sources.pop(path)
            if magnitude is not None:
                tensors[f"{peft_name}.{MAGNITUDE}"] = magnitude
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


def _alpha_for_rank(lora: LoraConfig, rank: int) -> float:
    """PEFT's alpha giving a rank-`rank` module the same scale as the configured rank."""
    return lora.scale * (rank**0.5 if lora.use_rslora else rank)


def _modules_to_save(chunk, args: GPTModelArgs) -> dict[str, torch.Tensor]:
    """HF name -> tensor of every trained-in-full (modules_to_save) parameter."""
    from megatron_swift.models.naming import canonical_parameters

    found = {}
    for name, param, _ in canonical_parameters(chunk):
        if param.requires_grad and not name.endswith(ADAPTER_KEYS):
            rule, bindings = args.mapping.resolve(name)
            found.update(zip(rule.hf_names(bindings), rule.to_hf(param.detach(), args.dims), strict=True))
    return found


def write_peft_adapter(out: Path, config, tensors: dict[str, torch.Tensor], base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    from safetensors.torch import save_file

    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    save_file(tensors, str(Path(out) / "adapter_model.safetensors"), metadata={"format": "pt"})


class PeftAdapterSource:
    """Starting adapters for `apply_lora(initial=...)`, read from a PEFT adapter directory.

    The adapter's rank, alpha and rslora setting must match `lora` (they set the scale); after
    `apply_lora`, `check_all_used()` fails if the adapter adapts modules the run does not target.
    """

    def __init__(self, adapter_dir: str | Path, args: GPTModelArgs, lora: LoraConfig, hf_config):
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora.layer import ParamWrapper
        from safetensors.torch import load_file

        self.dir, self.args = Path(adapter_dir), args
        weights = self.dir / "adapter_model.safetensors"
        if not (self.dir / "adapter_config.json").is_file() or not weights.is_file():
            raise CheckpointError(f"{self.dir}: not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
        peft_config = PeftLoraConfig.from_pretrained(str(self.dir))
        mismatched = [
            f"lora.{ours}={getattr(lora, ours)} but the adapter has {theirs}={getattr(peft_config, theirs)}"
            for ours, theirs in (
                ("rank", "r"),
                ("alpha", "lora_alpha"),
                ("use_rslora", "use_rslora"),
                ("use_dora", "use_dora"),
            )
            if getattr(lora, ours) != getattr(peft_config, theirs)
        ]
        if peft_config.rank_pattern or peft_config.alpha_pattern:
            mismatched.append("the adapter has rank_pattern/alpha_pattern; only uniform adapters are read")
        if mismatched:
            raise CheckpointError(f"{self.dir}: " + "; ".join(mismatched))
        tensors = load_file(str(weights))
        peft_config.base_model_name_or_path = None  # only the layer names matter here; PEFT warns on a mismatch
        self.linear: dict[str, tuple] = {}  # HF module -> (A, B, DoRA magnitude or None)
        self.params: dict[tuple[str, str], tuple] = {}  # (experts module, parameter) -> (A, B, experts)
        self.unread_experts: set[tuple[str, str, int]] = set()
        skeleton = _hf_skeleton(hf_config, args)
        self.module_of = {args.mapping.rules_name(name): name for name, _ in skeleton.named_modules()}
        for peft_name, path, layer in _peft_lora_layers(skeleton, peft_config):
            pair = tensors[f"{peft_name}.lora_A.weight"], tensors[f"{peft_name}.lora_B.weight"]
            if isinstance(layer, ParamWrapper):
                self.params[(path, layer.parameter_name)] = (*pair, layer.num_experts)
                self.unread_experts.update((path, layer.parameter_name, e) for e in range(layer.num_experts))
            else:
                self.linear[path] = (*pair, tensors.get(f"{peft_name}.{MAGNITUDE}"))
        self.fused = _fused_expert_params(args)

    def __call__(self, name: str, rule, bindings) -> tuple:
        """(A, B) or (A, B, DoRA magnitude) of the linear `name`, megatron layout, full size."""
        hf_modules = [self.module_of.get(m, m) for m in (n.removesuffix(".weight") for n in rule.hf_names(bindings))]
        if all(m in self.linear for m in hf_modules):
            triples = [self.linear.pop(m) for m in hf_modules]
            pairs = [(a, b) for a, b, _ in triples]
            magnitude = () if triples[0][2] is None else (rule.to_mcore([m for *_, m in triples], self.args.dims),)
            if all(torch.equal(a, pairs[0][0]) for a, _ in pairs):
                return pairs[0][0], rule.to_mcore([b for _, b in pairs], self.args.dims), *magnitude
            stacked_a = torch.cat([a for a, _ in pairs])
            blocks, start = [], 0
            for a, b in pairs:  # projection i reads only its own rank block of the stacked A
                block = b.new_zeros(b.shape[0], stacked_a.shape[0])
                block[:, start : start + a.shape[0]] = b
                blocks.append(block)
                start += a.shape[0]
            return stacked_a, rule.to_mcore(blocks, self.args.dims), *magnitude
        expert = _EXPERT.match(name)
        key = (hf_modules[0].rsplit(".", 2)[0], self.fused.get(expert.group(3))) if expert else None
        if key not in self.params:
            raise CheckpointError(f"{self.dir}: no adapter for {name} ({', '.join(hf_modules)}); make "
                                  "lora.target_modules match the adapter's target_modules")  # fmt: skip
        lora_a, lora_b, experts = self.params[key]
        index = int(expert.group(2))
        self.unread_experts.discard((*key, index))
        return _from_peft_experts(lora_a, lora_b, experts, index)

    def check_all_used(self) -> None:
        """Collective when distributed: what no rank read (each rank holds some layers / experts)."""
        import torch.distributed as dist

        left = set(self.linear) | {f"{m}.{p}[expert {e}]" for m, p, e in self.unread_experts}
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, left)
            left = set.intersection(*gathered)
        left = sorted(left)
        if left:
            raise CheckpointError(f"{self.dir}: the run's lora.target_modules do not cover the adapter's "
                                  f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")  # fmt: skip


def apply_lora_with_adapter(chunks, lora: LoraConfig, args: GPTModelArgs, hf_dir: str | Path, seed: int):
    """`apply_lora`, starting from the PEFT adapter `lora.adapter` when one is set; returns the report. A reward
    model's head is always trained in full next to the adapters (PEFT's SEQ_CLS adds it to modules_to_save)."""
    from megatron_swift.checkpoint.hf import load_hf_config
    from megatron_swift.models.reward import REWARD_HEAD_MODULE
    from megatron_swift.tuners.lora import apply_lora

    if args.reward_head and REWARD_HEAD_MODULE not in lora.modules_to_save:  # as PEFT's SEQ_CLS: trained in full
        lora = dataclasses.replace(lora, modules_to_save=[*lora.modules_to_save, REWARD_HEAD_MODULE])
    source = PeftAdapterSource(lora.adapter, args, lora, load_hf_config(hf_dir)) if lora.adapter else None
    report = apply_lora(chunks, lora, args.family, seed, initial=source)
    if source is not None:
        source.check_all_used()
    return report
