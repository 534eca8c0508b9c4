//! Which kernel namespace a sysctl key belongs to.
//!
//! * `net.*` → [`Scope::NetworkNamespace`]: every network namespace (every pod without
//!   `hostNetwork`) has its own copy, which starts from the kernel default, not the host's value;
//!   except the keys in [`NODE_GLOBAL_NET_EXACT`] / [`NODE_GLOBAL_NET_PREFIXES`].
//! * the System V IPC and POSIX message-queue keys → [`Scope::IpcNamespace`].
//! * everything else → [`Scope::Node`].
//!
//! Some `net.*` keys are not per network namespace at all: the kernel registers them only in the
//! initial network namespace (other namespaces do not have them, or see a read-only mirror of the
//! host value, mode 0444, like `net.core.rmem_max` or `net.netfilter.nf_conntrack_max`), and the
//! value on the host applies to the whole node (`net.ipv4.tcp_mem` caps TCP memory machine-wide,
//! `nf_conntrack_max` caps every pod's tracked connections, the neighbour tables' `default`
//! parameters such as `gc_thresh3` bound the one ARP/NDP table all namespaces share). They are
//! [`Scope::Node`], and the scope is a security boundary: a cluster policy of
//! `allowedScopes: [NetworkNamespace]` must not let a profile reach them. The list is checked
//! against the running kernel by `tests/scope_kernel.rs` (every `net.*` file the host can write
//! but a fresh network namespace cannot, or does not have, must be listed here, and nothing
//! else); it was measured on Linux 6.18 with `nf_conntrack` loaded.

use super::vocab::Scope;

use super::key::SysctlKey;

/// IPC-namespaced keys (exact, canonical dotted form).
pub const IPC_EXACT: &[&str] = &[
    "kernel.msg_next_id",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.sem_next_id",
    "kernel.shm_next_id",
    "kernel.shm_rmid_forced",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
];

/// IPC-namespaced key prefixes (POSIX message queues).
pub const IPC_PREFIXES: &[&str] = &["fs.mqueue."];

/// `net.*` keys that exist only in the initial network namespace (global to the node).
pub const NODE_GLOBAL_NET_EXACT: &[&str] = &[
    "net.core.busy_poll",
    "net.core.busy_read",
    "net.core.default_qdisc",
    "net.core.dev_weight",
    "net.core.dev_weight_rx_bias",
    "net.core.dev_weight_tx_bias",
    "net.core.devconf_inherit_init_net",
    "net.core.fb_tunnels_only_for_init_net",
    "net.core.flow_limit_cpu_bitmap",
    "net.core.flow_limit_table_len",
    "net.core.gro_normal_batch",
    "net.core.high_order_alloc_disable",
    "net.core.max_skb_frags",
    "net.core.mem_pcpu_rsv",
    "net.core.message_burst",
    "net.core.message_cost",
    "net.core.netdev_budget",
    "net.core.netdev_budget_usecs",
    "net.core.netdev_max_backlog",
    "net.core.netdev_rss_key",
    "net.core.netdev_tstamp_prequeue",
    "net.core.netdev_unregister_timeout_secs",
    "net.core.rmem_default",
    "net.core.rmem_max",
    "net.core.rps_sock_flow_entries",
    "net.core.skb_defer_max",
    "net.core.warnings",
    "net.core.wmem_default",
    "net.core.wmem_max",
    "net.ipv4.fib_sync_mem",
    "net.ipv4.ipfrag_secret_interval",
    "net.ipv4.route.error_burst",
    "net.ipv4.route.error_cost",
    "net.ipv4.route.gc_elasticity",
    "net.ipv4.route.gc_interval",
    "net.ipv4.route.gc_min_interval",
    "net.ipv4.route.gc_min_interval_ms",
    "net.ipv4.route.gc_thresh",
    "net.ipv4.route.gc_timeout",
    "net.ipv4.route.max_size",
    "net.ipv4.route.redirect_load",
    "net.ipv4.route.redirect_number",
    "net.ipv4.route.redirect_silence",
    "net.ipv4.tcp_allowed_congestion_control",
    "net.ipv4.tcp_available_ulp",
    "net.ipv4.tcp_low_latency",
    "net.ipv4.tcp_max_orphans",
    "net.ipv4.tcp_mem",
    "net.ipv4.udp_mem",
    "net.ipv6.ip6frag_secret_interval",
    "net.ipv6.mld_max_msf",
    "net.ipv6.mld_qrv",
    "net.netfilter.nf_conntrack_buckets",
    "net.netfilter.nf_conntrack_expect_max",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_log_all_netns",
    "net.nf_conntrack_max",
];

/// Prefixes of `net.*` keys that exist only in the initial network namespace.
pub const NODE_GLOBAL_NET_PREFIXES: &[&str] = &[
    "net.core.bpf_jit_",
    "net.ipv4.cipso_",
    "net.ipv4.inet_peer_",
    // The neighbour tables are one per protocol for the whole kernel; `default` holds the
    // table's own parameters (gc_thresh*, gc_interval) and what new interfaces start from.
    "net.ipv4.neigh.default.",
    "net.ipv6.calipso_",
    "net.ipv6.neigh.default.",
];

/// The scope of `key` (see the module docs).
pub fn scope_of(key: &SysctlKey) -> Scope {
    let dotted = key.dotted();
    let d = dotted.as_str();
    let listed = |exact: &[&str], prefixes: &[&str]| {
        exact.contains(&d) || prefixes.iter().any(|p| d.starts_with(p))
    };
    if d.starts_with("net.") {
        if listed(NODE_GLOBAL_NET_EXACT, NODE_GLOBAL_NET_PREFIXES) {
            Scope::Node
        } else {
            Scope::NetworkNamespace
        }
    } else if listed(IPC_EXACT, IPC_PREFIXES) {
        Scope::IpcNamespace
    } else {
        Scope::Node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(raw: &str) -> Scope {
        SysctlKey::parse(raw).unwrap().scope()
    }

    #[test]
    fn scopes() {
        for (raw, want) in [
            ("net.ipv4.tcp_fin_timeout", Scope::NetworkNamespace),
            ("net/ipv4/ip_local_port_range", Scope::NetworkNamespace),
            ("net.ipv4.conf.eth0/100.rp_filter", Scope::NetworkNamespace),
            ("net.core.somaxconn", Scope::NetworkNamespace),
            ("net.core.rmem_max", Scope::Node),
            ("net.ipv4.tcp_mem", Scope::Node),
            ("net.core.bpf_jit_harden", Scope::Node),
            // Issue 17: read-only mirrors of the host's value inside a pod's namespace.
            ("net.netfilter.nf_conntrack_max", Scope::Node),
            ("net/netfilter/nf_conntrack_buckets", Scope::Node),
            ("net.netfilter.nf_conntrack_expect_max", Scope::Node),
            ("net.ipv4.tcp_allowed_congestion_control", Scope::Node),
            ("net.ipv4.tcp_congestion_control", Scope::NetworkNamespace),
            ("net.ipv4.neigh.default.gc_thresh3", Scope::Node),
            ("net.ipv6.neigh.default.gc_thresh1", Scope::Node),
            ("net.ipv4.neigh.eth0.gc_stale_time", Scope::NetworkNamespace),
            ("net.ipv4.neigh.defaults.x", Scope::NetworkNamespace),
            (
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
                Scope::NetworkNamespace,
            ),
            ("kernel.shmmax", Scope::IpcNamespace),
            ("kernel/shmall", Scope::IpcNamespace),
            ("kernel.sem", Scope::IpcNamespace),
            ("kernel.msgmnb", Scope::IpcNamespace),
            ("kernel.shm_rmid_forced", Scope::IpcNamespace),
            ("fs.mqueue.msg_max", Scope::IpcNamespace),
            ("kernel.semaphore_thing", Scope::Node),
            ("kernel.pid_max", Scope::Node),
            ("vm.swappiness", Scope::Node),
            ("fs.file-max", Scope::Node),
            ("network.x", Scope::Node),
        ] {
            assert_eq!(scope(raw), want, "{raw}");
        }
    }

    #[test]
    fn lists_are_valid_canonical_keys() {
        for k in IPC_EXACT.iter().chain(NODE_GLOBAL_NET_EXACT) {
            assert_eq!(SysctlKey::parse(k).unwrap().dotted(), *k);
        }
        for p in IPC_PREFIXES.iter().chain(NODE_GLOBAL_NET_PREFIXES) {
            assert!(SysctlKey::parse(&format!("{p}x")).is_ok(), "{p}");
        }
    }
}
