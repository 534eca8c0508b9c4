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

/// Share of `tcp_max_tw_buckets` in use from which a node is under TIME_WAIT pressure: past
/// the cap the kernel destroys new TIME_WAIT sockets at once (losing the protection against
/// late segments) and logs "TCP: time wait bucket table overflow".
pub const PRESSURE_PERCENT: u64 = 90;

/// The kernel's `TcpExt` counter of TIME_WAIT sockets destroyed because the cap was reached.
const OVERFLOW_COUNTER: &str = "TCPTimeWaitOverflow";

/// `TCPTimeWaitOverflow` from the text of `/proc/net/netstat` (pairs of `TcpExt:` lines, names
/// then values). `None` when the kernel does not have it.
pub fn parse_overflows(netstat: &str) -> Option<u64> {
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = tcp_ext.next()?;
    let values = tcp_ext.next()?;
    let at = names
        .split_whitespace()
        .position(|n| n == OVERFLOW_COUNTER)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// What one pass learned about TIME_WAIT against its cap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimeWaitStatus {
    /// `TCPTimeWaitOverflow` now, when the kernel has it.
    pub overflows: Option<u64>,
    /// How much it rose since the last pass (0 on the first).
    pub new_overflows: u64,
    /// Why the node is under pressure; empty when it is not. Messages hold no counts, so a
    /// report under steady pressure is not rewritten on every pass.
    pub pressure: Vec<String>,
}

/// How long a rise of `TCPTimeWaitOverflow` keeps a node under pressure: the window of the
/// README's alert example (`increase(...[5m])`), so sporadic overflows hold the condition
/// instead of flapping it, and a burst is still in reports written minutes later.
pub const OVERFLOW_HOLD: Duration = Duration::from_secs(300);

/// Follows `TCPTimeWaitOverflow` between passes. A rise keeps the node under pressure for
/// `hold` ([`OVERFLOW_HOLD`] in the agent).
#[derive(Debug)]
pub struct TimeWaitWatch {
    hold: Duration,
    last: Option<u64>,
    last_rise: Option<Instant>,
}

impl TimeWaitWatch {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            last: None,
            last_rise: None,
        }
    }

    /// Judges `tw` buckets in use against `max` and the overflow counter read now (`None`:
    /// not available).
    pub fn assess(
        &mut self,
        tw: u64,
        max: u64,
        overflows: Option<u64>,
        now: Instant,
    ) -> TimeWaitStatus {
        let new_overflows = match (self.last, overflows) {
            // A counter that went down was reset (a new namespace): not a rise.
            (Some(before), Some(n)) => n.saturating_sub(before),
            _ => 0,
        };
        if overflows.is_some() {
            self.last = overflows;
        }
        if new_overflows > 0 {
            self.last_rise = Some(now);
        }
        let mut pressure = Vec::new();
        if max > 0 && tw.saturating_mul(100) >= max.saturating_mul(PRESSURE_PERCENT) {
            pressure.push(format!(
                "TIME_WAIT sockets at {PRESSURE_PERCENT}% or more of net.ipv4.tcp_max_tw_buckets ({max}): \
                 past it the kernel destroys them at once"
            ));
        }
        if self
            .last_rise
            .is_some_and(|at| now.saturating_duration_since(at) <= self.hold)
        {
            pressure.push(
                "the kernel destroyed TIME_WAIT sockets early because the bucket table was full \
                 (TcpExt TCPTimeWaitOverflow rising)"
                    .to_string(),
            );
        }
        TimeWaitStatus {
            overflows,
            new_overflows,
            pressure,
        }
    }
}

/// `TCPTimeWaitOverflow` under `proc_root` (normally `/proc`); `None` when unreadable (a
/// kernel without it, or a test tree).
pub fn read_overflows(proc_root: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(proc_root.join("net/netstat"))
        .ok()
        .as_deref()
        .and_then(parse_overflows)
}

/// The kernel's TCP damage counters of the node's namespace, with per-minute rates over windows
/// of one heartbeat (the report's rhythm: each written report carries a fresh rate).
#[derive(Debug)]
pub struct DamageCounters {
    proc_root: std::path::PathBuf,
    rates: tcpstat::counters::RateWindow,
    /// The totals last added to the metrics, to add only rises.
    seen: tcpstat::counters::Counters,
}

impl DamageCounters {
    pub fn new(proc_root: std::path::PathBuf, window: Duration) -> Self {
        Self {
            proc_root,
            rates: tcpstat::counters::RateWindow::new(window),
            seen: tcpstat::counters::Counters::new(),
        }
    }

    /// Reads the counters now; adds their rises to the metrics and returns the report's field.
    /// `None` (and a warning) when unreadable: the report then simply has no counters.
    pub fn sample(
        &mut self,
        metrics: &super::metrics::AgentMetrics,
    ) -> Option<crate::api::TcpCounterReport> {
        let counters = match tcpstat::counters::read(&self.proc_root) {
            Ok(c) => c,
            Err(e) => {
                metrics.tcp_count_errors.inc();
                tracing::warn!(error = %e, "reading the kernel's TCP counters failed");
                return None;
            }
        };
        for (name, total) in &counters {
            // A counter that went down restarted (a new namespace): all of it is new.
            let before = self.seen.get(name).copied().filter(|b| b <= total);
            metrics.add_kernel_counter(name, total - before.unwrap_or(0));
        }
        self.seen = counters.clone();
        let rates = self.rates.observe(Instant::now(), &counters);
        Some(counter_report(&rates, self.rates.span()))
    }
}

/// The report's field from one reading (integers only: the CRD holds no floats).
pub fn counter_report(
    rates: &[tcpstat::counters::CounterRate],
    span: Option<Duration>,
) -> crate::api::TcpCounterReport {
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    crate::api::TcpCounterReport {
        interval_seconds: span.map(|s| int(s.as_secs())),
        counters: rates
            .iter()
            .map(|c| crate::api::TcpCounterValue {
                name: c.name.to_string(),
                total: int(c.total),
                per_minute: c.per_minute.map(int),
            })
            .collect(),
    }
}

impl TcpCounter {
    /// Where this counter reads procfs.
    pub fn proc_root(&self) -> &std::path::Path {
        &self.options.proc_root
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

    #[test]
    fn parses_the_overflow_counter_by_name() {
        let text = "TcpExt: SyncookiesSent TW TCPTimeWaitOverflow PAWSActive\n\
                    TcpExt: 1 2 3000 4\n\
                    IpExt: InNoRoutes\nIpExt: 9\n";
        assert_eq!(parse_overflows(text), Some(3000));
        assert_eq!(parse_overflows("TcpExt: TW\nTcpExt: 2\n"), None);
        assert_eq!(parse_overflows("garbage"), None);
    }

    #[test]
    fn pressure_at_ninety_percent_and_while_overflows_rise() {
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        let mut w = TimeWaitWatch::new(Duration::from_secs(60));
        let calm = w.assess(4499, 5000, Some(10), t0);
        assert!(calm.pressure.is_empty(), "{calm:?}");
        assert_eq!(calm.new_overflows, 0, "the first reading is no rise");
        let full = w.assess(4500, 5000, Some(10), later(1));
        assert_eq!(full.pressure.len(), 1, "{full:?}");
        assert!(full.pressure[0].contains("(5000)"));
        // Fewer TIME_WAIT sockets, but the kernel dropped some since the last pass.
        let dropped = w.assess(100, 5000, Some(3010), later(2));
        assert_eq!(dropped.new_overflows, 3000);
        assert_eq!(dropped.pressure.len(), 1);
        assert!(dropped.pressure[0].contains("TCPTimeWaitOverflow"));
        // Held for the heartbeat, then calm again.
        assert_eq!(w.assess(100, 5000, Some(3010), later(50)).pressure.len(), 1);
        assert!(
            w.assess(100, 5000, Some(3010), later(70))
                .pressure
                .is_empty()
        );
        // A reset counter is no rise; no cap known is no pressure.
        assert_eq!(w.assess(100, 5000, Some(5), later(80)).new_overflows, 0);
        assert!(w.assess(100, 0, None, later(90)).pressure.is_empty());
    }

    #[test]
    fn damage_counters_reach_the_report_and_the_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |overflows: u64| {
            std::fs::create_dir_all(dir.path().join("net")).expect("mkdir");
            std::fs::write(
                dir.path().join("net/netstat"),
                format!("TcpExt: ListenOverflows ListenDrops\nTcpExt: {overflows} 2\n"),
            )
            .expect("write");
            std::fs::write(
                dir.path().join("net/snmp"),
                "Tcp: RetransSegs OutSegs\nTcp: 40 1000\n",
            )
            .expect("write");
        };
        write(10);
        let metrics = super::super::metrics::AgentMetrics::default();
        let mut damage = DamageCounters::new(dir.path().to_path_buf(), Duration::ZERO);
        let first = damage.sample(&metrics).expect("readable");
        assert_eq!(first.interval_seconds, None, "no window closed yet");
        assert_eq!(first.get("ListenOverflows").map(|c| c.total), Some(10));
        assert_eq!(first.get("RetransSegs").map(|c| c.total), Some(40));
        write(25);
        let second = damage.sample(&metrics).expect("readable");
        let lo = second.get("ListenOverflows").expect("present");
        assert_eq!(lo.total, 25);
        assert!(lo.per_minute.is_some_and(|r| r > 0), "{second:?}");
        let text = metrics.render();
        assert!(
            text.contains("nodetune_tcp_kernel_counter_total{counter=\"ListenOverflows\"} 25\n"),
            "{text}"
        );
        // Unreadable: no field, an error counted, and the agent goes on.
        std::fs::remove_file(dir.path().join("net/snmp")).expect("rm");
        assert_eq!(damage.sample(&metrics), None);
        assert_eq!(metrics.tcp_count_errors.get(), 1);
    }
}
