#!/usr/bin/env bash
# After training, on CPU: make a tiny Qwen2, fine-tune it briefly on the sample chats (1 process),
# export the checkpoint to HF, then examples/eval_and_quantize.sh: evaluate base vs tuned side by
# side, quantize the tuned model to int8 and check the export for vLLM.
#   bash examples/post_training.sh [OUT_DIR]        (default outputs/post_training; must not exist)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/post_training}
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or pass another directory" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python examples/make_tiny_model.py --family qwen2 --out "$OUT/hf-base"
torchrun --nproc_per_node 1 launch/pretrain_sft.py --config examples/tiny_sft.yaml \
  --model.hf "$OUT/hf-base" --parallel.tensor_model_parallel_size 1 --parallel.sequence_parallel false \
  --train.train_iters 20 --checkpoint.output_dir "$OUT/run" --checkpoint.save "$OUT/run/checkpoints" \
  --checkpoint.save_interval 20
python -m converters mcore-to-hf --mcore "$OUT/run/checkpoints" --out "$OUT/hf-tuned"
bash examples/eval_and_quantize.sh "$OUT/hf-base" "$OUT/hf-tuned" "$OUT"
