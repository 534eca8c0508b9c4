//! TCP counting on the agent in two tiers: sockstat (one small file: TIME_WAIT buckets, sockets
//! in use, orphans) on every pass, the full per-state walk of the kernel's socket table only once
//! per `walk_every` (the report heartbeat, when the counts are written anyway). On a proxy with a
//! million sockets the walk is the one cost of an idle agent that grows with the node's load.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::PartialObjectMeta;

use super::config::AgentArgs;
use super::pods::PodNames;
use crate::podnet;
use crate::tcpstat::{self, SnapshotOptions, TcpSnapshot, TcpStatError};

/// The pods' counter: the same tiers as the host's (sockstat every pass, the walk once per
/// heartbeat), bounded per pass in namespaces and time.
pub fn pod_counter(args: &AgentArgs) -> podnet::PodCounter {
    podnet::PodCounter::new(
        std::path::PathBuf::from("/proc"),
        podnet::Limits {
            max_namespaces: args.pod_max_namespaces,
            budget: args.pod_budget,
            ..podnet::Limits::default()
        },
        args.heartbeat,
    )
}

/// UID to (namespace, name) of the pods the agent's watch holds.
pub fn pod_names(pods: &[std::sync::Arc<PartialObjectMeta<Pod>>]) -> PodNames {
    pods.iter()
        .filter_map(|p| {
            let m = &p.metadata;
            Some((
                m.uid.clone()?,
                (m.namespace.clone().unwrap_or_default(), m.name.clone()?),
            ))
        })
        .collect()
}

/// Which tier produced a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Every socket walked: per-state counts are fresh.
    Walk,
    /// Sockstat re-read; per-state counts are from the last walk.
    Sockstat,
}

pub struct TcpCounter {
    options: SnapshotOptions,
    walk_every: Duration,
    last: Option<(Instant, TcpSnapshot)>,
}

impl TcpCounter {
    pub fn new(options: SnapshotOptions, walk_every: Duration) -> Self {
        Self {
            options,
            walk_every,
            last: None,
        }
    }

    /// Counts for this pass: a walk when none was made for `walk_every`, else the last walk's
    /// per-state counts with fresh sockstat figures.
    pub fn count(&mut self) -> Result<(TcpSnapshot, Tier), TcpStatError> {
        if let Some((at, last)) = &self.last
            && at.elapsed() < self.walk_every
        {
            let sockstat = tcpstat::sockstat::read_sockstat(&self.options.proc_root)?;
            return Ok((
                TcpSnapshot {
                    sockstat,
                    ..last.clone()
                },
                Tier::Sockstat,
            ));
        }
        let snapshot = tcpstat::snapshot_with(&self.options)?;
        self.last = Some((Instant::now(), snapshot.clone()));
        Ok((snapshot, Tier::Walk))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tcpstat::{SourceChoice, TcpState};

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    /// A procfs root with `listeners` LISTEN sockets and `tw` TIME_WAIT buckets in sockstat.
    fn fixture(root: &Path, listeners: usize, tw: u64) {
        std::fs::create_dir_all(root.join("net")).expect("mkdir");
        std::fs::create_dir_all(root.join("sys/net/ipv4")).expect("mkdir");
        let mut tcp = HEADER.to_string();
        for i in 0..listeners {
            tcp.push_str(&format!(
                "   {i}: 0100007F:{:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {} 1 0000000000000000 100 0 0 10 0\n",
                8000 + i,
                1000 + i
            ));
        }
        std::fs::write(root.join("net/tcp"), tcp).expect("write");
        std::fs::write(root.join("net/tcp6"), HEADER).expect("write");
        std::fs::write(
            root.join("net/sockstat"),
            format!("sockets: used 10\nTCP: inuse 1 orphan 0 tw {tw} alloc 2 mem 1\n"),
        )
        .expect("write");
        std::fs::write(root.join("sys/net/ipv4/tcp_max_tw_buckets"), "262144\n").expect("write");
        std::fs::write(
            root.join("sys/net/ipv4/ip_local_port_range"),
            "32768\t60999\n",
        )
        .expect("write");
    }

    fn options(root: &Path) -> SnapshotOptions {
        SnapshotOptions {
            source: SourceChoice::Procfs,
            proc_root: root.to_path_buf(),
        }
    }

    #[test]
    fn walks_once_per_period_and_rereads_sockstat_in_between() {
        let dir = tempfile::tempdir().expect("tempdir");
        fixture(dir.path(), 2, 5);
        let mut counter = TcpCounter::new(options(dir.path()), Duration::from_secs(3600));
        let (first, tier) = counter.count().expect("count");
        assert_eq!(tier, Tier::Walk);
        assert_eq!(first.total.get(TcpState::Listen), 2);
        assert_eq!(first.sockstat.tcp_tw, 5);

        // The table and sockstat change; within the period only sockstat is read again.
        fixture(dir.path(), 3, 9);
        let (second, tier) = counter.count().expect("count");
        assert_eq!(tier, Tier::Sockstat);
        assert_eq!(
            second.total.get(TcpState::Listen),
            2,
            "per-state counts from the walk"
        );
        assert_eq!(second.sockstat.tcp_tw, 9, "sockstat is fresh");

        // Once the period is over, a walk again.
        counter.walk_every = Duration::ZERO;
        let (third, tier) = counter.count().expect("count");
        assert_eq!(tier, Tier::Walk);
        assert_eq!(third.total.get(TcpState::Listen), 3);
    }
}
