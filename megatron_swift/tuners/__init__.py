"""Parameter-efficient fine-tuning on megatron-core models (LoRA)."""
