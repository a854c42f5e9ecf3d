"""Checkpoint I/O that applies the family declarations: HF safetensors <-> sharded megatron-core models.

- `hf`: validated lazy reading and streamed sharded writing of HF directories;
- `engine`: a family's rules applied in both directions (HF tensors into this rank's shards, and out);
- `mcore`: megatron-core checkpoint directories (converted or training) and the model part of them;
- `export`: megatron-core checkpoint -> HF safetensors, streamed rule by rule (`distcp` reads regions of
  stored tensors, `shards` lays out and writes the HF files);
- `peft`: LoRA adapters as PEFT directories (export, and continuing from one).

Used by the training job (training/job.py) and by the offline converter CLI (converters/).
"""
