#!/usr/bin/env bash
# Every GPU check, in priority order, inside one wall-clock budget; one summary (JSON + Markdown) in --out.
#
#   bash tests/gpu/run_all.sh [--out DIR] [--budget SECONDS] [--smoke]
#
# Each check runs under its own cap (or what is left of the budget, if less); a check that fails or
# runs out of time is recorded and the next one starts, and a check with under MIN_START seconds of
# budget left is skipped. --out (default $OUT, else gpu-results) receives summary.json, summary.md and
# checks.log (every check's output) and nothing else: the device returns at most 8 files. --smoke runs
# every script's CPU smoke mode (checks the scripts, measures nothing). Exit status 0 when every check
# passed. PYTHON picks the interpreter (default python3); the repo root is put on PYTHONPATH, so the
# package needs no install (tests/gpu/bundle.sh prints the command that adds its missing dependencies).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=${OUT:-gpu-results}
BUDGET=480
MIN_START=20
SMOKE=()
while (($#)); do
    case $1 in
        --out) DEST=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --smoke) SMOKE=(--smoke); shift ;;
        *) echo "usage: $0 [--out DIR] [--budget SECONDS] [--smoke]" >&2; exit 2 ;;
    esac
done

# name, cap in seconds, script: the issue's priority order. The caps add up to more than the default
# budget on purpose: a fast early check leaves its time to the later ones.
CHECKS=(
    "conversion 120 check_gpu.py"       # every family converted on CUDA (NCCL, no shims), logits vs HF
    "train 150 train_gpu.py"            # ~1.2B Llama bf16 step: step time, tokens/s, MFU
    "lora 60 lora_gpu.py"               # LoRA logits on CUDA vs HF + PEFT
    "kernels 150 kernels_gpu.py"        # Triton kernels: error vs torch, bandwidth vs a copy, timings
    "moe 60 moe_gpu.py"                 # all-to-all vs all-gather token dispatcher
    "post_training 90 post_training_gpu.py"  # eval on CUDA, int8 quantization
)

export PYTHONPATH="$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
mkdir -p "$DEST"
: >"$DEST/checks.log"
start=$SECONDS
for entry in "${CHECKS[@]}"; do
    read -r name cap script <<<"$entry"
    left=$((BUDGET - (SECONDS - start)))
    if ((left < MIN_START)); then
        printf '%s\t%s\tskipped\t\t0\t%s\n' "$name" "$script" "$cap" >>"$PARTS/status.tsv"
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$DEST/checks.log"
        continue
    fi
    limit=$((cap < left ? cap : left))
    echo "== $name: tests/gpu/$script ${SMOKE[*]} (cap ${limit}s)" | tee -a "$DEST/checks.log"
    began=$SECONDS
    # timeout signals the check's whole process group, so workers it spawned end with it.
    timeout --kill-after=10 "$limit" "$PYTHON" "$REPO/tests/gpu/$script" --out "$PARTS/$name" "${SMOKE[@]}" \
        >"$PARTS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status=timed_out ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$script" "$status" "$rc" $((SECONDS - began)) "$limit" \
        >>"$PARTS/status.tsv"
    cat "$PARTS/$name.log" >>"$DEST/checks.log"
    echo "== $name: $status (exit $rc) in $((SECONDS - began))s" | tee -a "$DEST/checks.log"
done

"$PYTHON" "$REPO/tests/gpu/summary.py" "$PARTS" "$DEST" --budget "$BUDGET" --elapsed $((SECONDS - start)) \
    "${SMOKE[@]}"
