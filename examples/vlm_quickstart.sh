#!/usr/bin/env bash
# Vision-language fine-tuning end to end, on CPU: a tiny random Qwen2.5-VL (its tokenizer trained on the dataset's
# words), the generated shapes dataset (one coloured shape an image; "What colour ...?" / "What shape ...?" with
# one-word answers; train and held-out splits), LoRA SFT of the language model with the vision tower and aligner
# frozen, data parallel over 2 processes (examples/tiny_vlm_lora.yaml), export with the adapters merged, then
# `mswift-eval --qa` on the held-out split: base vs tuned accuracy side by side.
#   bash examples/vlm_quickstart.sh [OUT_DIR [TRAINING OVERRIDES...]]   (default outputs/vlm_quickstart; must not
#   exist; e.g. --train.train_iters 2). TRAIN_ROWS / HELD_OUT_ROWS size the splits (default 256 / 64).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/vlm_quickstart}
shift $(($# > 0 ? 1 : 0))
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or pass another directory" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python -m megatron_swift.data.synthetic_shapes "$OUT/data" --train "${TRAIN_ROWS:-256}" \
  --held-out "${HELD_OUT_ROWS:-64}" --corpus "$OUT/data/corpus.txt"
python examples/make_tiny_model.py --family qwen2_5_vl --out "$OUT/hf-base" --tokenizer-corpus "$OUT/data/corpus.txt"
torchrun --nproc_per_node 2 launch/pretrain_sft.py --config examples/tiny_vlm_lora.yaml \
  --model.hf "$OUT/hf-base" --data.dataset "$OUT/data/train.jsonl" \
  --checkpoint.output_dir "$OUT/run" --checkpoint.save "$OUT/run/checkpoints" "$@"
python -m converters mcore-to-hf --mcore "$OUT/run/checkpoints" --out "$OUT/hf-tuned" --merge-lora
python -m megatron_swift.eval --model base="$OUT/hf-base" --model tuned="$OUT/hf-tuned" \
  --qa "$OUT/data/held_out.jsonl" --max-new-tokens 4 --out "$OUT/eval"
echo "training checkpoints: $OUT/run/checkpoints (latest: $(cat "$OUT/run/checkpoints/latest"))"
echo "fine-tuned HF model:  $OUT/hf-tuned (LoRA merged; serve check: python -m megatron_swift.serve --model $OUT/hf-tuned --dry-run)"
echo "held-out predictions: $OUT/eval/predictions-{base,tuned}-qa.jsonl"
