# Sourced by launch/torchrun.sh and launch/slurm/common.sh.
#
# mswift_forward_signals CMD [ARGS...]: run CMD in the background, pass SIGTERM / SIGUSR1 / SIGINT this shell
# receives on to it as SIGTERM, wait until it has really ended and return its exit status. (A shell waiting
# for a foreground child runs no trap until the child ends; an untrapped SIGUSR1 would kill the shell.)
mswift_forward_signals() {
  "$@" &
  local child=$! rc
  trap 'kill -TERM "$child" 2>/dev/null' TERM USR1 INT
  while :; do
    rc=0
    wait "$child" || rc=$? # (`||`: callers may run under set -e)
    kill -0 "$child" 2>/dev/null || break # a trapped signal interrupted the wait: the child still runs
  done
  trap - TERM USR1 INT
  return "$rc"
}
