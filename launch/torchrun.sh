#!/usr/bin/env bash
# torchrun for one node, ending with 0 when a preemption signal ended the run cleanly.
#
#   bash launch/torchrun.sh [torchrun options] launch/pretrain_sft.py --config FILE.yaml [overrides]
#
# A SIGTERM / SIGUSR1 / SIGINT to this script is passed to torchrun, which forwards it to every rank; a
# signal to torchrun or to the ranks directly (Slurm signals every process of the step) works the same:
# each rank finishes its step, saves a checkpoint and exits 0. torchrun still reports the signal it
# received as a failure (exit 1); every rank that ended cleanly leaves a note in $MSWIFT_CLEAN_EXIT_DIR
# (megatron_swift/training/preemption.py), and when all of this node's ranks did, this script exits 0.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/signals.sh"

clean_dir=$(mktemp -d "${TMPDIR:-/tmp}/mswift-clean-exit.XXXXXX")
export MSWIFT_CLEAN_EXIT_DIR=$clean_dir
rc=0
mswift_forward_signals torchrun "$@" || rc=$?
# torchrun can end before its ranks: a second signal while it waits for them (Slurm signals every process of
# the step, and the trap above forwards too) aborts that wait. Wait for the ranks themselves (each left its pid,
# megatron_swift/training/preemption.py), at most MSWIFT_RANK_EXIT_WAIT seconds, before reading their notes.
deadline=$((SECONDS + ${MSWIFT_RANK_EXIT_WAIT:-90}))
for pid_note in "$clean_dir"/pid_*; do
  [ -e "$pid_note" ] || continue
  pid=$(cat "$pid_note")
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
done
if [ "$rc" -ne 0 ]; then
  notes=("$clean_dir"/rank_*)
  expected=$(head -n 1 "${notes[0]}" 2>/dev/null | awk '{print $2}')
  if [ -e "${notes[0]}" ] && [ "${#notes[@]}" -eq "${expected:-0}" ]; then
    echo "mswift: torchrun exited $rc after a signal; all ${#notes[@]} ranks of this node saved and ended cleanly"
    rc=0
  fi
fi
rm -rf "$clean_dir"
exit "$rc"
