//! The agent's metrics, encoded by `prometheus-client`. Labels are bounded sets (states,
//! families), never object names.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::tuner::PassOutcome;
use crate::api::KeyState;
use crate::tcpstat::{StateCounts, TcpState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    family: &'static str,
    state: &'static str,
}

/// Per-pod gauges: only for the report's top pods (at most 10 pods x 11 states per node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    state: &'static str,
}

/// One of the fixed kernel counters (`tcpstat::counters::COUNTERS`): a bounded label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelCounterLabels {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    state: &'static str,
}

#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    pub passes: Counter,
    pub drift_corrections: Counter,
    pub report_writes: Counter,
    pub report_writes_skipped: Counter,
    pub report_write_errors: Counter,
    pub restores: Counter,
    /// Keys that became contested (another writer keeps changing them).
    pub contested: Counter,
    /// Corrections of contested keys left out while they back off.
    pub contest_holds: Counter,
    pub tcp_count_errors: Counter,
    pub watch_errors: Counter,
    /// TIME_WAIT sockets the kernel destroyed early (rises of `TCPTimeWaitOverflow` seen).
    pub tcp_time_wait_overflows: Counter,
    ready: Gauge,
    tcp_sockets: Family<TcpLabels, Gauge>,
    tcp_kernel_counters: Family<KernelCounterLabels, Counter>,
    tcp_time_wait_buckets: Gauge,
    tcp_max_tw_buckets: Gauge,
    sysctl_keys: Family<KeyLabels, Gauge>,
    pod_tcp_sockets: Family<PodLabels, Gauge>,
    pod_time_wait: Gauge,
    pod_namespaces: Gauge,
}

const KEY_STATES: [KeyState; 9] = [
    KeyState::Applied,
    KeyState::DryRun,
    KeyState::Unsupported,
    KeyState::Invalid,
    KeyState::Denied,
    KeyState::Overridden,
    KeyState::Failed,
    KeyState::Restored,
    KeyState::Contested,
];

/// The label value of a key state: its name in reports (exhaustive, so a new state must be named).
fn key_state_label(s: KeyState) -> &'static str {
    match s {
        KeyState::Applied => "Applied",
        KeyState::DryRun => "DryRun",
        KeyState::Unsupported => "Unsupported",
        KeyState::Invalid => "Invalid",
        KeyState::Denied => "Denied",
        KeyState::Overridden => "Overridden",
        KeyState::Failed => "Failed",
        KeyState::Restored => "Restored",
        KeyState::Contested => "Contested",
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            passes: Counter::default(),
            drift_corrections: Counter::default(),
            report_writes: Counter::default(),
            report_writes_skipped: Counter::default(),
            report_write_errors: Counter::default(),
            restores: Counter::default(),
            contested: Counter::default(),
            contest_holds: Counter::default(),
            tcp_count_errors: Counter::default(),
            watch_errors: Counter::default(),
            tcp_time_wait_overflows: Counter::default(),
            ready: Gauge::default(),
            tcp_sockets: Family::default(),
            tcp_kernel_counters: Family::default(),
            tcp_time_wait_buckets: Gauge::default(),
            tcp_max_tw_buckets: Gauge::default(),
            sysctl_keys: Family::default(),
            pod_tcp_sockets: Family::default(),
            pod_time_wait: Gauge::default(),
            pod_namespaces: Gauge::default(),
        };
        // Registration order is exposition order (`exported_names` lists it).
        register_agent(&mut m);
        register_node_tcp(&mut m);
        register_pods(&mut m);
        m
    }
}

/// The agent's own work: its passes and writes (counters), readiness, and key results.
fn register_agent(m: &mut AgentMetrics) {
    // Counters without `_total`: the encoder appends it.
    let counters = [
        ("passes", "Reconcile passes run", &m.passes),
        (
            "drift_corrections",
            "Keys found changed behind the agent's back and written again",
            &m.drift_corrections,
        ),
        ("report_writes", "NodeTuningReport writes", &m.report_writes),
        (
            "report_writes_skipped",
            "Passes whose report was unchanged and not yet due for a heartbeat",
            &m.report_writes_skipped,
        ),
        (
            "report_write_errors",
            "Failed NodeTuningReport writes",
            &m.report_write_errors,
        ),
        ("restores", "Original values put back", &m.restores),
        (
            "contested_keys",
            "Keys that became contested: corrected more often than the threshold within the window",
            &m.contested,
        ),
        (
            "contest_holds",
            "Corrections of contested keys left out while they back off",
            &m.contest_holds,
        ),
        (
            "tcp_count_errors",
            "Failed TCP socket counts",
            &m.tcp_count_errors,
        ),
        (
            "watch_errors",
            "Failed watches of profiles or the node (retried with backoff)",
            &m.watch_errors,
        ),
    ];
    let r = &mut m.registry;
    for (name, help, counter) in counters {
        r.register(format!("nodetune_agent_{name}"), help, counter.clone());
    }
    r.register(
        "nodetune_agent_ready",
        "Whether the first apply and report succeeded",
        m.ready.clone(),
    );
}

/// The node's own network namespace (sockets per state, TIME_WAIT buckets, their limit and
/// overflows), then the keys' results on the node.
fn register_node_tcp(m: &mut AgentMetrics) {
    let r = &mut m.registry;
    r.register(
        "nodetune_tcp_sockets",
        "TCP sockets per state and family in the node's network namespace",
        m.tcp_sockets.clone(),
    );
    r.register(
        "nodetune_tcp_time_wait_buckets",
        "TIME_WAIT buckets in use (the tw field of /proc/net/sockstat), read every pass",
        m.tcp_time_wait_buckets.clone(),
    );
    r.register(
        "nodetune_tcp_time_wait_overflows",
        "TIME_WAIT sockets the kernel destroyed early because tcp_max_tw_buckets was reached \
         (rises of TcpExt TCPTimeWaitOverflow seen by the agent)",
        m.tcp_time_wait_overflows.clone(),
    );
    r.register(
        "nodetune_tcp_max_tw_buckets",
        "net.ipv4.tcp_max_tw_buckets: past it the kernel destroys TIME_WAIT sockets early",
        m.tcp_max_tw_buckets.clone(),
    );
    r.register(
        "nodetune_tcp_kernel_counter",
        "The kernel's TCP counters of the node's network namespace (TcpExt of \
         /proc/net/netstat, Tcp of /proc/net/snmp), by counter name, from the agent's first \
         reading on",
        m.tcp_kernel_counters.clone(),
    );
    r.register(
        "nodetune_sysctl_keys",
        "Sysctl keys per result state on this node",
        m.sysctl_keys.clone(),
    );
}

/// The pods' network namespaces: the top pods' sockets, all pods' TIME_WAIT, how many counted.
fn register_pods(m: &mut AgentMetrics) {
    let r = &mut m.registry;
    r.register(
        "nodetune_pod_tcp_sockets",
        "TCP sockets per state in the network namespaces of the node's top 10 pods by TIME_WAIT",
        m.pod_tcp_sockets.clone(),
    );
    let gauges = [
        (
            "nodetune_pod_tcp_time_wait",
            "TIME_WAIT sockets over all pod network namespaces (sockstat tw), read every pass",
            &m.pod_time_wait,
        ),
        (
            "nodetune_pod_network_namespaces",
            "Pod network namespaces counted in the last pass",
            &m.pod_namespaces,
        ),
    ];
    for (name, help, gauge) in gauges {
        r.register(name, help, gauge.clone());
    }
}

impl AgentMetrics {
    /// Pod figures of one pass. The per-pod family is rebuilt, so a pod that leaves the top
    /// list (or the node) leaves no stale series behind.
    pub fn set_pods(&self, pods: &crate::api::PodsTcp) {
        self.pod_time_wait.set(pods.time_wait);
        self.pod_namespaces.set(i64::from(pods.namespaces));
        self.pod_tcp_sockets.clear();
        for p in &pods.top {
            // A pod the watch has not named yet is shown by UID.
            let pod = if p.name.is_empty() { &p.uid } else { &p.name };
            for state in TcpState::ALL {
                let n = p.states.get(state.as_str()).copied().unwrap_or_default();
                self.pod_tcp_sockets
                    .get_or_create(&PodLabels {
                        namespace: p.namespace.clone(),
                        pod: pod.clone(),
                        state: state.as_str(),
                    })
                    .set(n);
            }
        }
    }

    /// Counts one tuner pass: the pass itself, its drift corrections and restores, and the
    /// key states it left.
    pub fn record_pass(&self, pass: &PassOutcome) {
        self.passes.inc();
        self.drift_corrections.inc_by(pass.drifted);
        self.restores.inc_by(pass.restores);
        self.contested.inc_by(pass.newly_contested);
        self.contest_holds.inc_by(pass.held);
        self.set_key_states(pass.results.iter().map(|r| r.state));
    }

    pub fn set_tcp(&self, ipv4: StateCounts, ipv6: StateCounts) {
        for (family, counts) in [("ipv4", ipv4), ("ipv6", ipv6)] {
            for state in TcpState::ALL {
                self.tcp_sockets
                    .get_or_create(&TcpLabels {
                        family,
                        state: state.as_str(),
                    })
                    .set(gauge_value(counts.get(state)));
            }
        }
    }

    /// The cheap tier: sockstat figures, fresh every pass.
    pub fn set_sockstat(&self, s: &crate::tcpstat::sockstat::Sockstat) {
        self.tcp_time_wait_buckets.set(gauge_value(s.tcp_tw));
        self.tcp_max_tw_buckets
            .set(gauge_value(s.tcp_max_tw_buckets));
    }

    /// Adds `rise` to the kernel counter `counter` (one of the fixed list's names).
    pub fn add_kernel_counter(&self, counter: &'static str, rise: u64) {
        self.tcp_kernel_counters
            .get_or_create(&KernelCounterLabels { counter })
            .inc_by(rise);
    }

    pub fn set_key_states(&self, states: impl IntoIterator<Item = KeyState>) {
        let states: Vec<KeyState> = states.into_iter().collect();
        for s in KEY_STATES {
            let n = states.iter().filter(|x| **x == s).count() as u64;
            self.sysctl_keys
                .get_or_create(&KeyLabels {
                    state: key_state_label(s),
                })
                .set(gauge_value(n));
        }
    }

    /// The first apply and report succeeded.
    pub fn set_ready(&self) {
        self.ready.set(1);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Prometheus text exposition (format 0.0.4), as `/metrics` serves it to clients that do not
    /// ask for OpenMetrics.
    pub fn render(&self) -> String {
        crate::http::encode(&self.registry, crate::http::Format::Prometheus).unwrap_or_default()
    }
}

impl crate::http::Exporter for AgentMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn readiness(&self) -> Result<(), &'static str> {
        if self.is_ready() {
            Ok(())
        } else {
            Err("the first report is not written yet")
        }
    }
}

/// The metric family names `/metrics` shows, e.g. `nodetune_agent_restores_total`.
pub fn exported_names() -> Vec<String> {
    let m = AgentMetrics::default();
    // Labelled families are on /metrics from their first series on.
    m.set_tcp(StateCounts::default(), StateCounts::default());
    m.set_key_states([]);
    m.add_kernel_counter("ListenOverflows", 0);
    m.set_pods(&sample_pods());
    crate::http::family_names(&m.registry)
}

/// One counted pod, so that the per-pod family shows.
fn sample_pods() -> crate::api::PodsTcp {
    crate::api::PodsTcp {
        top: vec![crate::api::PodTcp {
            uid: "sample".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_state_and_key_state() {
        let m = AgentMetrics::default();
        let mut v4 = StateCounts::default();
        v4.set(TcpState::TimeWait, 7);
        m.set_tcp(v4, StateCounts::default());
        m.set_key_states([KeyState::Applied, KeyState::Applied, KeyState::Unsupported]);
        m.drift_corrections.inc_by(2);
        let text = m.render();
        assert!(
            text.contains("nodetune_tcp_sockets{family=\"ipv4\",state=\"TIME_WAIT\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("nodetune_tcp_sockets{family=\"ipv6\",state=\"LISTEN\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("nodetune_sysctl_keys{state=\"Applied\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nodetune_sysctl_keys{state=\"Restored\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("nodetune_agent_drift_corrections_total 2"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nodetune_agent_restores_total counter\n"),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("nodetune_tcp_sockets{"))
                .count(),
            22
        );
        // A second count replaces the first instead of adding series.
        m.set_tcp(StateCounts::default(), StateCounts::default());
        let text = m.render();
        assert!(text.contains("nodetune_tcp_sockets{family=\"ipv4\",state=\"TIME_WAIT\"} 0"));
    }

    #[test]
    fn per_pod_series_follow_the_top_pods_and_leave_with_them() {
        let m = AgentMetrics::default();
        let pod = |name: &str, tw: i64| crate::api::PodTcp {
            namespace: "web".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            time_wait: tw,
            total: tw,
            states: [("TIME_WAIT".to_string(), tw)].into(),
        };
        let mut pods = crate::api::PodsTcp {
            namespaces: 2,
            time_wait: 1_500,
            top: vec![pod("squid-0", 1_478), pod("", 22)],
            ..Default::default()
        };
        m.set_pods(&pods);
        let text = m.render();
        assert!(
            text.contains(
                "nodetune_pod_tcp_sockets{namespace=\"web\",pod=\"squid-0\",state=\"TIME_WAIT\"} 1478"
            ),
            "{text}"
        );
        assert!(
            text.contains("pod=\"uid-\",state=\"TIME_WAIT\"} 22"),
            "{text}"
        );
        assert!(text.contains("nodetune_pod_tcp_time_wait 1500\n"), "{text}");
        let series = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("nodetune_pod_tcp_sockets{"))
                .count()
        };
        assert_eq!(series(&text), 2 * TcpState::ALL.len());
        // squid-0 leaves the top list: its series go, none linger.
        pods.top.remove(0);
        m.set_pods(&pods);
        let text = m.render();
        assert!(!text.contains("squid-0"), "{text}");
        assert_eq!(series(&text), TcpState::ALL.len());
    }

    #[test]
    fn key_state_labels_are_the_report_names() {
        for s in KEY_STATES {
            assert_eq!(
                serde_json::to_value(s).expect("serialize"),
                serde_json::Value::from(key_state_label(s))
            );
        }
    }

    #[test]
    fn readiness_follows_the_first_report() {
        use crate::http::Exporter;
        let m = AgentMetrics::default();
        assert!(m.readiness().is_err());
        assert!(m.render().contains("nodetune_agent_ready 0\n"));
        m.set_ready();
        assert!(m.readiness().is_ok());
        assert!(m.render().contains("nodetune_agent_ready 1\n"));
    }

    #[test]
    fn exported_names_are_the_families_on_metrics() {
        let names = exported_names();
        assert_eq!(
            names,
            [
                "nodetune_agent_passes_total",
                "nodetune_agent_drift_corrections_total",
                "nodetune_agent_report_writes_total",
                "nodetune_agent_report_writes_skipped_total",
                "nodetune_agent_report_write_errors_total",
                "nodetune_agent_restores_total",
                "nodetune_agent_contested_keys_total",
                "nodetune_agent_contest_holds_total",
                "nodetune_agent_tcp_count_errors_total",
                "nodetune_agent_watch_errors_total",
                "nodetune_agent_ready",
                "nodetune_tcp_sockets",
                "nodetune_tcp_time_wait_buckets",
                "nodetune_tcp_time_wait_overflows_total",
                "nodetune_tcp_max_tw_buckets",
                "nodetune_tcp_kernel_counter_total",
                "nodetune_sysctl_keys",
                "nodetune_pod_tcp_sockets",
                "nodetune_pod_tcp_time_wait",
                "nodetune_pod_network_namespaces",
            ]
        );
        // Each one has a sample once the agent has counted (a pod too) and passed once.
        let m = AgentMetrics::default();
        m.set_tcp(StateCounts::default(), StateCounts::default());
        m.set_key_states([]);
        m.add_kernel_counter("ListenOverflows", 0);
        m.set_pods(&sample_pods());
        let text = m.render();
        for name in &names {
            assert!(
                text.lines().any(
                    |l| l.starts_with(name.as_str()) && l[name.len()..].starts_with([' ', '{'])
                ),
                "{name} has no sample:\n{text}"
            );
        }
    }
}
