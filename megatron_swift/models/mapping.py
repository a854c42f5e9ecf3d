"""The vocabulary of HF <-> megatron-core parameter mappings, as data.

A family file lists `Rule`s; each rule names one megatron-core parameter (a template with
`{layer}` / `{expert}` placeholders over *global* indices) and the HF tensors it is made of, and
knows how to convert in both directions and how to cut its tensor-parallel shard. The rules are
pure tensor functions: no I/O, no collectives, no knowledge of files or ranks.

An HF name ending in `[i]` addresses slice i along dim 0 of a stacked tensor (gpt-oss stores all experts of a
layer as one [experts, ...] tensor): readers take that slice, exporters write it at its offset in the stacked
tensor (`stacked_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_PLACEHOLDER = re.compile(r"\\\{(layer|expert|path)\\\}")
# `{layer}` / `{expert}` are indices; `{path}` is a whole dotted subtree (a `Rename` of every parameter of a module
# kept as HF builds it, e.g. a vision tower: `Rename("vision_model.{path}", hf_name="visual.{path}")`).
_PLACEHOLDER_PATTERNS = {"layer": r"\d+", "expert": r"\d+", "path": r"[\w.]+"}
_SLICE = re.compile(r"^(?P<base>.+)\[(?P<index>\d+|\{expert\})\]$")


def stacked_name(hf_name: str) -> tuple[str, int | None]:
    """(stacked tensor name, slice index) of `NAME[i]`; (hf_name, None) for a whole tensor."""
    found = _SLICE.match(hf_name)
    if not found or not found.group("index").isdigit():
        return hf_name, None
    return found.group("base"), int(found.group("index"))


def renamed_prefix(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """`name` with the prefix of the first (prefix, replacement) pair it starts with replaced; else unchanged."""
    for prefix, replacement in pairs:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def template_regex(template: str) -> re.Pattern:
    pattern = _PLACEHOLDER.sub(lambda m: rf"(?P<{m.group(1)}>{_PLACEHOLDER_PATTERNS[m.group(1)]})", re.escape(template))
    return re.compile("^" + pattern + "$")


@dataclass(frozen=True)
class ModelDims:
    """The sizes the fused layouts depend on."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


@dataclass(frozen=True)
class Rule:
    """One megatron-core parameter <- one or more HF tensors."""

    mcore: str

    def __post_init__(self):
        object.__setattr__(self, "_mcore_re", template_regex(self.mcore))

    @property
    def hf(self) -> tuple[str, ...]:
        raise NotImplementedError

    def match(self, mcore_name: str) -> dict[str, str] | None:
        found = self._mcore_re.match(mcore_name)
        return found.groupdict() if found else None

    def hf_names(self, bindings: dict[str, str]) -> list[str]:
        return [name.format(**bindings) for name in self.hf]

    def to_mcore(self, hf_tensors: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, mcore_tensor: torch.Tensor, dims: ModelDims) -> list[torch.Tensor]:
        raise NotImplementedError

    def tp_shard(self, full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
        """This rank's slice of the full tensor along the partition dim."""
        return torch.chunk(full, size, dim=dim)[rank]


@dataclass(frozen=True)
class Rename(Rule):
    hf_name: str = ""

    @property
    def hf(self):
        return (self.hf_name,)

    def to_mcore(self, hf_tensors, dims):
        return hf_tensors[0]

    def to_hf(self, mcore_tensor, dims):
        return [mcore_tensor]


@dataclass(frozen=True)
class PaddedVocab(Rule):
    """Embedding / output rows: megatron pads the vocabulary so every TP rank holds an equal slice.

    Padding rows are zero on import and dropped on export.
    """

    hf_name: str = ""

    @property
    def hf(self):
        return (self.hf_name,)

    def to_mcore(self, hf_tensors, dims):
        (weight,) = hf_tensors
        pad = dims.padded_vocab_size - weight.shape[0]
        if pad < 0:
            raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {dims.padded_vocab_size}")
        return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])]) if pad else weight

    def to_hf(self, mcore_tensor, dims):
        return [mcore_tensor[: dims.vocab_size]]


@dataclass(frozen=True)
class FusedQKV(Rule):
    """linear_qkv = per query group [q heads of the group; k; v] (megatron's interleaved layout).

    Grouping by query group keeps every TP rank's chunk a whole set of groups, so a plain chunk
    along dim 0 is the right shard. Works for weights ([out, in]) and biases ([out]).
    """

    q: str = ""
    k: str = ""
    v: str = ""

    @property
    def hf(self):
        return (self.q, self.k, self.v)

    def to_mcore(self, hf_tensors, dims):
        q, k, v = hf_tensors
        groups, head_dim = dims.num_query_groups, dims.head_dim
        heads_per_group = dims.num_attention_heads // groups
        rest = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, heads_per_group * head_dim, *rest),
                k.reshape(groups, head_dim, *rest),
                v.reshape(groups, head_dim, *rest),
            ],
            dim=1,
        )
        return fused.reshape(-1, *rest)

    def to_hf(self, mcore_tensor, dims):
        groups, head_dim = dims.num_query_groups, dims.head_dim
        heads_per_group = dims.num_attention_heads // groups
        rest = mcore_tensor.shape[1:]
        grouped = mcore_tensor.reshape(groups, (heads_per_group + 2) * head_dim, *rest)
        q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


@dataclass(frozen=True)
class FusedGateUp(Rule):
    """linear_fc1 = [gate; up] for gated MLPs (SwiGLU).

    Megatron shards each half separately: TP rank r holds [gate_r; up_r], not a contiguous chunk.
    """

    gate: str = ""
    up: str = ""

    @property
    def hf(self):
        return (self.gate, self.up)

    def to_mcore(self, hf_tensors, dims):
        return torch.cat(hf_tensors, dim=0)

    def to_hf(self, mcore_tensor, dims):
        return [t.contiguous() for t in torch.chunk(mcore_tensor, 2, dim=0)]

    def tp_shard(self, full, dim, rank, size):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=dim)[rank], torch.chunk(up, size, dim=dim)[rank]], dim=0)


@dataclass(frozen=True)
class RuleSet:
    """All rules of a family, with lookups in both directions."""

    rules: tuple[Rule, ...]
    # HF tensors present in some checkpoints that carry no information (e.g. cached rotary tables).
    ignore_hf: tuple[str, ...] = ()
    # Other HF layouts of the same tensors, read as the rules' names: (stored prefix, rules' prefix) pairs, e.g.
    # transformers 5's `model.language_model.` for the hub's `model.` (checkpoint/hf.py `HFCheckpoint.use_aliases`).
    # Exports write the rules' names.
    hf_aliases: tuple[tuple[str, str], ...] = ()
    _hf_res: tuple = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(
            self,
            "_hf_res",
            tuple(template_regex(_SLICE.sub(r"\g<base>", t)) for rule in self.rules for t in rule.hf)
            + tuple(re.compile(p) for p in self.ignore_hf),
        )

    def resolve(self, mcore_name: str) -> tuple[Rule, dict[str, str]]:
        for rule in self.rules:
            bindings = rule.match(mcore_name)
            if bindings is not None:
                return rule, bindings
        raise KeyError(f"no mapping rule for megatron-core parameter {mcore_name!r}")

    def is_known_hf(self, hf_name: str) -> bool:
        return any(regex.match(hf_name) for regex in self._hf_res)

    def rules_name(self, hf_name: str) -> str:
        """`hf_name` (a tensor or module name of any of the family's HF layouts) as the rules name it."""
        return renamed_prefix(hf_name, self.hf_aliases)


@dataclass(frozen=True)
class ExpertSlice(Rule):
    """One expert's linear <- its slice of an HF tensor stacking every expert (`NAME[{expert}]`), stored
    transposed ([in, out], gpt-oss's `x @ W` layout); with `interleaved_gate_up` the HF output columns
    alternate gate / up (gpt-oss's gate_up_proj: gate = [..., ::2], up = [..., 1::2]), megatron's linear_fc1
    is [gate; up]. Works for weights ([in, out] -> [out, in]) and biases ([out])."""

    hf_name: str = ""
    interleaved_gate_up: bool = False

    @property
    def hf(self):
        return (f"{self.hf_name}[{{expert}}]",)

    def to_mcore(self, hf_tensors, dims):
        (tensor,) = hf_tensors
        tensor = tensor.t() if tensor.dim() == 2 else tensor
        if self.interleaved_gate_up:
            tensor = torch.cat([tensor[0::2], tensor[1::2]], dim=0)
        return tensor.contiguous()

    def to_hf(self, mcore_tensor, dims):
        tensor = mcore_tensor
        if self.interleaved_gate_up:
            gate, up = torch.chunk(tensor, 2, dim=0)
            tensor = torch.stack([gate, up], dim=1).reshape(tensor.shape)
        return [(tensor.t() if tensor.dim() == 2 else tensor).contiguous()]

    def tp_shard(self, full, dim, rank, size):
        if not self.interleaved_gate_up:
            return super().tp_shard(full, dim, rank, size)
        return FusedGateUp.tp_shard(self, full, dim, rank, size)
