#!/usr/bin/env bash
# Agent training at small scale, on CPU: synthetic ToolBench-Static-style tool-use conversations
# (megatron_swift/data/synthetic_agent.py; in-domain tools for training, held-out tools for an out-of-domain
# test), a small random Llama with a tokenizer trained on the training text, full SFT (examples/agent/agent_sft.yaml),
# export to HF, then `mswift-eval --agent` base vs tuned on the in-domain and the out-of-domain steps. Repeated per
# seed (model initialisation and training seed; the data is the same), then one table, mean and spread over seeds.
#   bash examples/agent_sft.sh [OUT_DIR]          (default outputs/agent; must not exist)
#   SEEDS="1 2 3" bash examples/agent_sft.sh      (the README's table; default SEEDS=1)
#   PARALLEL=1 ...                                (the seeds' runs side by side, one thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/agent}
SEEDS=${SEEDS:-1}
STEPS=${STEPS:-100}
PARALLEL=${PARALLEL:-0}
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or pass another directory" >&2
  exit 2
fi

run_seed() {
  local SEED=$1 RUN=$OUT/seed$1
  python examples/make_tiny_model.py --family llama --out "$RUN/hf-base" --seed "$SEED" \
    --tokenizer-corpus "$OUT/data/tokenizer_corpus.txt" --tokenizer-vocab 1024 --config vocab_size=1024 \
    --config hidden_size=128 --config intermediate_size=352 --config num_attention_heads=4 \
    --config num_key_value_heads=2 --config num_hidden_layers=4
  torchrun --nproc_per_node 1 --master_port $((29400 + SEED)) launch/pretrain_sft.py \
    --config examples/agent/agent_sft.yaml --model.hf "$RUN/hf-base" --data.dataset "$OUT/data/train.jsonl" \
    --train.seed "$SEED" --train.train_iters "$STEPS" --checkpoint.save_interval "$STEPS" \
    --checkpoint.output_dir "$RUN/run" --checkpoint.save "$RUN/run/checkpoints"
  python -m converters mcore-to-hf --mcore "$RUN/run/checkpoints" --out "$RUN/hf-tuned"
  for SPLIT in in_domain out_of_domain; do
    python -m megatron_swift.eval --model base="$RUN/hf-base" --model tuned="$RUN/hf-tuned" \
      --agent "$OUT/data/test_$SPLIT.jsonl" --max-new-tokens 72 --batch-size 32 --out "$RUN/eval_$SPLIT"
  done
}

python -m megatron_swift.data.synthetic_agent --out "$OUT/data" --train 1200 --test 60 --seed 0
if [ "$PARALLEL" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PIDS=()
  for SEED in $SEEDS; do
    run_seed "$SEED" > "$OUT/seed$SEED.log" 2>&1 &
    PIDS+=($!)
  done
  for PID in "${PIDS[@]}"; do wait "$PID"; done   # set -e: a failed seed stops the script here
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  for SEED in $SEEDS; do run_seed "$SEED"; done
fi
python examples/agent/summarize.py "$OUT" | tee "$OUT/summary.md"
