"""Techniques: named sets of dotted job overrides, and the checked run list of one comparison.

A technique is what it changes in the user's job (`--section.field value` pairs, the training CLI's own
override syntax) and how many ranks it launches. Built-ins cover the tuning methods (full, lora, rslora, dora),
memory savers (recompute, packing, the fused linear cross-entropy) and layouts (tp2, tp2-sp, pp2, dp2). Names
compose with `+` (`lora+recompute-selective`); users add their own as `name=--a.b v --c.d w`. Everything is
checked here, without side effects, before any run starts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_swift.config import ConfigError

_LORA = ("--train.train_type", "lora")


@dataclass(frozen=True)
class Technique:
    name: str
    overrides: tuple[str, ...] = ()  # --section.field value tokens, applied after the job file
    nproc: int | None = None  # ranks to launch; None: the job's model-parallel size (data parallel 1)
    description: str = ""


def _layout(tp: int = 1, pp: int = 1, sp: bool = False) -> tuple[str, ...]:
    return ("--parallel.tensor_model_parallel_size", str(tp), "--parallel.pipeline_model_parallel_size", str(pp),
            "--parallel.context_parallel_size", "1", "--parallel.sequence_parallel", str(sp).lower())  # fmt: skip


BUILTIN: dict[str, Technique] = {
    t.name: t
    for t in [
        Technique("full", ("--train.train_type", "full"), description="full fine-tuning"),
        Technique("lora", _LORA, description="LoRA (the job's lora section)"),
        Technique("rslora", (*_LORA, "--lora.use_rslora", "true"), description="LoRA scaled alpha/sqrt(rank)"),
        Technique("dora", (*_LORA, "--lora.use_dora", "true"), description="DoRA (weight-decomposed LoRA)"),
        Technique(
            "recompute-selective",
            ("--train.recompute_granularity", "selective"),
            description="recompute the attention core in the backward",
        ),
        Technique(
            "recompute-full",
            (
                "--train.recompute_granularity",
                "full",
                "--train.recompute_method",
                "uniform",
                "--train.recompute_num_layers",
                "1",
            ),
            description="recompute every layer in the backward",
        ),
        Technique("packing", ("--data.packing", "true"), description="several samples per row"),
        Technique(
            "fused-loss",
            ("--model.fused_linear_cross_entropy", "true"),
            description="loss without [tokens, vocab] logits",
        ),
        Technique("tp2", _layout(tp=2), nproc=2, description="tensor parallel 2"),
        Technique("tp2-sp", _layout(tp=2, sp=True), nproc=2, description="tensor parallel 2 + sequence parallel"),
        Technique("pp2", _layout(pp=2), nproc=2, description="pipeline parallel 2"),
        Technique("dp2", _layout(), nproc=2, description="data parallel 2"),
    ]
}
ALIASES = {"recompute": "recompute-selective"}


def known_names() -> list[str]:
    return [*BUILTIN, *ALIASES]


def _builtin(name: str) -> Technique:
    if name in ALIASES:
        return BUILTIN[ALIASES[name]]
    if name not in BUILTIN:
        raise ConfigError(
            f"--techniques: unknown technique {name!r}; known: {', '.join(known_names())} (combine them with '+', "
            f"or define one as NAME='--section.field value ...')"
        )
    return BUILTIN[name]


def _custom(spec: str) -> Technique:
    name, _, tokens = spec.partition("=")
    name = name.strip()
    if not name or any(c in name for c in "/+, ") or name in BUILTIN or name in ALIASES:
        raise ConfigError(f"technique {spec!r}: give NAME=--section.field value ... with a new NAME "
                          f"(no '/', '+', ',' or spaces; built-ins: {', '.join(known_names())})")  # fmt: skip
    overrides = tuple(shlex.split(tokens))
    if not overrides or not overrides[0].startswith("--"):
        raise ConfigError(f"technique {name!r}: its overrides must look like --section.field value (got {tokens!r})")
    nproc = None
    if "--nproc" in overrides:  # a custom layout says how many ranks it needs
        at = overrides.index("--nproc")
        try:
            nproc = int(overrides[at + 1])
        except (IndexError, ValueError):
            raise ConfigError(f"technique {name!r}: --nproc needs a number of ranks") from None
        overrides = overrides[:at] + overrides[at + 2 :]
    return Technique(name, overrides, nproc, description="user-defined")


def parse_technique(spec: str) -> Technique:
    """`name`, `a+b` (built-ins combined, later ones win) or `name=--a.b v --c.d w`."""
    spec = spec.strip()
    if "=" in spec:
        return _custom(spec)
    parts = [_builtin(part.strip()) for part in spec.split("+")]
    nprocs = {p.nproc for p in parts if p.nproc is not None}
    if len(nprocs) > 1:
        raise ConfigError(f"technique {spec!r}: combines layouts of different sizes ({sorted(nprocs)} ranks)")
    overrides = tuple(token for part in parts for token in part.overrides)
    return Technique(spec, overrides, nprocs.pop() if nprocs else None, " + ".join(p.description for p in parts))


@dataclass
class Plan:
    """The checked comparison: the job file, what every run shares, and the techniques in order."""

    config: str
    common_overrides: list[str]
    techniques: list[Technique]
    nproc: dict[str, int] = field(default_factory=dict)  # technique -> ranks


def plan_runs(config: str, technique_lists: list[str], extra: list[str], common_overrides: list[str]) -> Plan:
    """Parse and check every technique against the job file (each merged job must load: known fields, valid
    values) before anything runs; raises one ConfigError listing every problem."""
    from megatron_swift.config import load_config
    from megatron_swift.training.config import JobConfig

    if not Path(config).is_file():
        raise ConfigError(f"--config {config}: no such job file")
    specs = [s for group in technique_lists for s in group.split(",") if s.strip()] + list(extra)
    if not specs:
        raise ConfigError(f"no techniques given: --techniques NAME,NAME,... (known: {', '.join(known_names())})")
    problems, techniques = [], []
    for spec in specs:
        try:
            techniques.append(parse_technique(spec))
        except ConfigError as exc:
            problems.append(str(exc))
    names = [t.name for t in techniques]
    problems += [f"technique {n!r} is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    plan = Plan(config, list(common_overrides), techniques)
    for technique in techniques:
        try:
            job = load_config(JobConfig, config, [*common_overrides, *technique.overrides])
        except ConfigError as exc:
            problems.append(f"technique {technique.name!r}: {exc}")
            continue
        p = job.parallel
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        plan.nproc[technique.name] = technique.nproc or model_parallel
    if problems:
        raise ConfigError("\n  ".join([f"{len(problems)} problem(s) with the techniques:", *problems]))
    return plan
