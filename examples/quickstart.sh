#!/usr/bin/env bash
# The main job on the embedded default, on CPU: make a tiny Llama (3.1-style rope scaling) with its
# tokenizer, convert it to a megatron-core checkpoint written from a 2-rank TP2 layout, check its
# logits against HF at TP2 and at PP2 (resharded on load), and export it back to HF safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/quickstart}
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or pass another output directory" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python examples/make_tiny_model.py --family llama --out "$OUT/hf"
python -m converters hf-to-mcore --hf "$OUT/hf" --out "$OUT/mcore" --tp 2
python -m converters check --hf "$OUT/hf" --mcore "$OUT/mcore" --tp 2
python -m converters check --hf "$OUT/hf" --mcore "$OUT/mcore" --pp 2
python -m converters mcore-to-hf --mcore "$OUT/mcore" --out "$OUT/hf-export"
echo "megatron-core checkpoint: $OUT/mcore"
echo "HF export:                $OUT/hf-export"
