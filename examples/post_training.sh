#!/usr/bin/env bash
# After training, on CPU: make a tiny Qwen2, fine-tune it briefly on the sample chats (1 process),
# export the checkpoint to HF, evaluate base vs tuned side by side (perplexity with the training loss
# mask, QA accuracy, agent metrics), quantize the tuned model to int8 (size + perplexity before/after)
# and check the export for vLLM (prints the `vllm serve` command).
#   bash examples/post_training.sh [OUT_DIR]        (default outputs/post_training; must not exist)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/post_training}
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or pass another directory" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=examples/data

python examples/make_tiny_model.py --family qwen2 --out "$OUT/hf-base"
torchrun --nproc_per_node 1 launch/pretrain_sft.py --config examples/tiny_sft.yaml \
  --model.hf "$OUT/hf-base" --parallel.tensor_model_parallel_size 1 --parallel.sequence_parallel false \
  --train.train_iters 20 --checkpoint.output_dir "$OUT/run" --checkpoint.save "$OUT/run/checkpoints" \
  --checkpoint.save_interval 20
python -m converters mcore-to-hf --mcore "$OUT/run/checkpoints" --out "$OUT/hf-tuned"
python -m megatron_swift.eval --model base="$OUT/hf-base" --model tuned="$OUT/hf-tuned" \
  --perplexity $DATA/sft_sample.jsonl --seq-length 64 --qa $DATA/qa_sample.jsonl \
  --agent $DATA/agent_sample.jsonl --max-new-tokens 24 --out "$OUT/eval"
python -m megatron_swift.quantize --model "$OUT/hf-tuned" --out "$OUT/hf-tuned-int8" \
  --eval-data $DATA/sft_sample.jsonl --seq-length 64
python -m megatron_swift.serve --model "$OUT/hf-tuned" --max-model-len 512 --dry-run
echo "evaluation report: $OUT/eval/report.md"
echo "int8 model:        $OUT/hf-tuned-int8 (report.md inside)"
