# Sourced by the sbatch templates: locate the repo and start torchrun for the job's nodes.
#   MSWIFT_REPO            repo checkout (default: the directory sbatch was called from)
#   MSWIFT_NPROC_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1)
#   MSWIFT_RDZV_PORT       rendezvous port on the first node (default 29500)

REPO=${MSWIFT_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
NNODES=${SLURM_NNODES:-1}
NPROC_PER_NODE=${MSWIFT_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
[ "${NPROC_PER_NODE:-0}" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$REPO/launch/signals.sh"

# Run SCRIPT ARGS... under torchrun (launch/torchrun.sh) on every node of the allocation. One node: a
# standalone torchrun (no srun, so the script also runs outside Slurm); several: one per node via srun,
# meeting at a c10d rendezvous on the first node. Signals this shell receives (the templates ask Slurm for
# SIGTERM 120 s before the time limit) are passed on; a preempted run that saved ends with 0.
mswift_torchrun() {
  if [ "$NNODES" -eq 1 ]; then
    mswift_forward_signals bash "$REPO/launch/torchrun.sh" --standalone --nproc_per_node "$NPROC_PER_NODE" "$@"
  else
    local head
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    mswift_forward_signals srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$REPO/launch/torchrun.sh" \
      --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --rdzv_id "${SLURM_JOB_ID}" --rdzv_backend c10d \
      --rdzv_endpoint "$head:${MSWIFT_RDZV_PORT:-29500}" "$@"
  fi
}

# Run a single-process command once (on the first node when the allocation has several).
mswift_once() {
  if [ "$NNODES" -eq 1 ]; then "$@"; else srun --nodes=1 --ntasks=1 "$@"; fi
}
