"""The `vllm serve` command line for an HF directory and its LoRA adapters (OpenAI-compatible API).

`ServeConfig` holds the options; `build_vllm_command` renders them as vLLM's CLI spells them.
Adapters switch on `--enable-lora` with `--lora-modules NAME=DIR ...` (each is then served under
NAME), and `--max-lora-rank` is raised to the smallest rank vLLM accepts that fits every adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The ranks vLLM's LoRA config accepts for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ServeConfig:
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> PEFT adapter directory
    served_model_name: str | None = None
    host: str | None = None
    port: int | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    max_lora_rank: int | None = None  # None: derived from the adapters
    max_loras: int | None = None
    extra_args: list[str] = field(default_factory=list)  # passed to vllm verbatim

    def problems(self) -> list[str]:
        found = []
        if self.tensor_parallel_size < 1:
            found.append("--tensor-parallel-size must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            found.append("--max-model-len must be >= 1")
        if self.port is not None and not 0 < self.port < 65536:
            found.append(f"--port {self.port}: not a TCP port")
        if self.dtype is not None and self.dtype not in DTYPES:
            found.append(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            found.append("--gpu-memory-utilization must be in (0, 1]")
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            found.append(f"--max-lora-rank {self.max_lora_rank}: vLLM accepts {VLLM_LORA_RANKS}")
        if self.max_loras is not None and not self.adapters:
            found.append("--max-loras without any --adapter")
        if self.served_model_name in self.adapters:
            found.append(f"--served-model-name {self.served_model_name!r} is also an adapter name")
        return found


def lora_rank_for(ranks: list[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that is at least every adapter's rank."""
    needed = max(ranks)
    for rank in VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise ValueError(f"LoRA rank {needed} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def build_vllm_command(config: ServeConfig) -> list[str]:
    command = ["vllm", "serve", config.model]
    options = [
        ("--served-model-name", config.served_model_name),
        ("--host", config.host),
        ("--port", config.port),
        ("--tensor-parallel-size", config.tensor_parallel_size),
        ("--max-model-len", config.max_model_len),
        ("--dtype", config.dtype),
        ("--gpu-memory-utilization", config.gpu_memory_utilization),
    ]
    command += [item for flag, value in options if value is not None for item in (flag, str(value))]
    if config.adapters:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in config.adapters.items())]
        if config.max_lora_rank is not None:
            command += ["--max-lora-rank", str(config.max_lora_rank)]
        if config.max_loras is not None:
            command += ["--max-loras", str(config.max_loras)]
    return command + list(config.extra_args)
