# Shared helpers of tests/cluster/{up,down,node}; sourced, not run.
# shellcheck shell=bash

cluster_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Per-instance network slots: instance N (1..250) owns 198.18.N.0/24 (RFC 2544 benchmark
# range, reserved for our own test hosts), the bridge ntc<N>br (host address 198.18.N.1)
# and the loopback ports 20000+10*N .. 20000+10*N+9. A slot is claimed by an atomic
# mkdir under $slot_root and released by `down`; slots of dead owners are reclaimed.
# shellcheck disable=SC2034 # used by up and down
slot_root="${NODETUNE_CLUSTER_SLOTS:-/run/nodetune-cluster}"

clog() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { clog "error: $*"; exit 1; }

cluster_bin_dir() {
  if [[ -n "${NODETUNE_CLUSTER_BIN:-}" ]]; then echo "$NODETUNE_CLUSTER_BIN"; else "$cluster_here/build" --print-bin-dir; fi
}

# Reads DIR/cluster.env into the current shell.
load_cluster_env() {
  local dir="$1"
  [[ -f "$dir/cluster.env" ]] || die "$dir/cluster.env not found (not a cluster dir?)"
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
}

# Kills a process group (TERM, then KILL after $2 seconds, default 5).
kill_group() {
  local pid="$1" grace="${2:-5}" i
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

# Removes one node's namespace: kills what runs in it, deletes the namespace (its veth end,
# and so the pair, goes with it).
delete_netns() {
  local ns="$1" pids
  ip netns list 2>/dev/null | grep -qw -- "$ns" || return 0
  pids="$(ip netns pids "$ns" 2>/dev/null || true)"
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  fi
  ip netns delete "$ns" 2>/dev/null || true
}
