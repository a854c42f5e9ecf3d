"""megatron-swift: HF checkpoints in, megatron-core training, HF checkpoints out."""

__version__ = "0.1.0"
