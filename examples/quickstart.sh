#!/usr/bin/env bash
# The main job on the embedded default, on CPU: make a tiny Llama (3.1-style rope scaling) with its
# tokenizer, LoRA-fine-tune it on the shipped sample chats with tensor parallel 2 (+ sequence parallel)
# on 2 processes, loading the HF weights straight into the sharded model, then export the result as
# an HF model with the adapters merged in and as a PEFT adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/quickstart
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it to run the quickstart again" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python examples/make_tiny_model.py --family llama --out "$OUT/hf"
torchrun --nproc_per_node 2 launch/pretrain_sft.py --config examples/tiny_lora_sft.yaml
python -m converters mcore-to-hf --mcore "$OUT/run/checkpoints" --out "$OUT/hf-tuned" --merge-lora
python -m converters mcore-to-hf --mcore "$OUT/run/checkpoints" --out "$OUT/adapter" --adapter-only
echo "training checkpoints: $OUT/run/checkpoints (latest: $(cat "$OUT/run/checkpoints/latest"))"
echo "metrics:              $OUT/run/logs/metrics.jsonl"
echo "fine-tuned HF model:  $OUT/hf-tuned (LoRA merged)"
echo "PEFT adapter:         $OUT/adapter"
