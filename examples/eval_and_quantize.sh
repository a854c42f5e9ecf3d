#!/usr/bin/env bash
# The after-training half of examples/post_training.sh, for any base and tuned HF directories:
# evaluate both side by side (perplexity with the training loss mask, QA accuracy, agent metrics),
# quantize the tuned model to int8 (size + perplexity before/after), and check the tuned export for
# vLLM (prints the `vllm serve` command).
#   bash examples/eval_and_quantize.sh BASE_HF_DIR TUNED_HF_DIR OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 3 ]; then
  echo "usage: $0 BASE_HF_DIR TUNED_HF_DIR OUT_DIR" >&2
  exit 2
fi
BASE=$1 TUNED=$2 OUT=$3
DATA=examples/data

python -m megatron_swift.eval --model base="$BASE" --model tuned="$TUNED" \
  --perplexity $DATA/sft_sample.jsonl --seq-length 64 --qa $DATA/qa_sample.jsonl \
  --agent $DATA/agent_sample.jsonl --max-new-tokens 24 --out "$OUT/eval"
python -m megatron_swift.quantize --model "$TUNED" --out "$OUT/tuned-int8" \
  --eval-data $DATA/sft_sample.jsonl --seq-length 64
python -m megatron_swift.serve --model "$TUNED" --max-model-len 512 --dry-run
echo "evaluation report: $OUT/eval/report.md"
echo "int8 model:        $OUT/tuned-int8 (report.md inside)"
