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

# Directory of the kubelet-node components (kubelet, containerd, ctr, pause.tar).
node_bin_dir() {
  if [[ -n "${NODETUNE_NODE_BIN:-}" ]]; then echo "$NODETUNE_NODE_BIN"; else "$cluster_here/build" --print-node-dir; fi
}

# Mount points at or under $1, deepest first (from this mount namespace's mountinfo; octal
# escapes such as \040 are left as they are, our paths have none).
mounts_under() {
  local root="$1"
  awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}

# Cgroup directories of a kubelet node (its cgroupRoot in every hierarchy), deepest first.
node_cgroup_dirs() {
  local cg="$1" h
  for h in /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg"; do
    [[ -d "$h" ]] && find "$h" -depth -type d
  done
  return 0
}

# Listening sockets of the containerd shims running in network namespace $1.
shim_sockets() {
  local ns="$1" p
  for p in $(ip netns pids "$ns" 2>/dev/null); do
    [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == containerd-shim* ]] || continue
    nsenter --net="/run/netns/$ns" -- ss -Hxlp 2>/dev/null | awk -v pat="pid=$p," 'index($0, pat) { print $5 }'
  done | grep '^/run/containerd/s/' | sort -u
  return 0
}

# Stops everything a kubelet node runs, also after a failed test or a crashed kubelet:
# the kubelet, every process in the node's cgroups (containers), containerd and its shims
# (they live in the node's namespace), then mounts under the node dir (container rootfs,
# pod volumes, the pods' network namespaces, which containerd keeps under its state dir)
# and the node's cgroups. Idempotent.
kubelet_node_down() {
  local nd="$1" cg pids i m d
  [[ -f "$nd/pids/kubelet.pid" ]] && kill_group "$(cat "$nd/pids/kubelet.pid")" 5
  cg="$(cat "$nd/cgroup" 2>/dev/null || true)"
  if [[ -n "$cg" ]]; then
    for ((i = 0; i < 50; i++)); do
      pids="$(node_cgroup_dirs "$cg" | while read -r d; do cat "$d/cgroup.procs" 2>/dev/null; done | sort -u)"
      [[ -n "$pids" ]] || break
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      sleep 0.1
    done
  fi
  # containerd keeps the shims' sockets in a fixed directory of this machine
  # (/run/containerd/s); shims killed below cannot remove theirs.
  local socks=""
  [[ -f "$nd/netns" ]] && socks="$(shim_sockets "$(cat "$nd/netns")")"
  [[ -f "$nd/pids/containerd.pid" ]] && kill_group "$(cat "$nd/pids/containerd.pid")" 5
  # Shims left their process group; they (and anything else) are found by namespace.
  [[ -f "$nd/netns" ]] && delete_netns "$(cat "$nd/netns")"
  # shellcheck disable=SC2086
  [[ -n "$socks" ]] && rm -f $socks
  for ((i = 0; i < 3; i++)); do
    while read -r m; do
      [[ -n "$m" ]] || continue
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$nd")
    mounts_under "$nd" | grep -q . || break
    sleep 0.2
  done
  if [[ -n "$cg" ]]; then
    node_cgroup_dirs "$cg" | while read -r d; do rmdir "$d" 2>/dev/null || true; done
    if node_cgroup_dirs "$cg" | grep -q .; then clog "warning: cgroups of $cg left: $(node_cgroup_dirs "$cg" | head -3 | tr '\n' ' ')"; fi
  fi
  rm -f "$nd/pids/kubelet.pid" "$nd/pids/containerd.pid"
}
