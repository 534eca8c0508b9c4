//! The agent's Prometheus metrics: plain atomics rendered as text. Labels are bounded sets
//! (states, families), never object names.
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::api::KeyState;
use crate::tcpstat::{StateCounts, TcpState};

#[derive(Default)]
pub struct AgentMetrics {
    pub passes: AtomicU64,
    pub drift_corrections: AtomicU64,
    pub report_writes: AtomicU64,
    pub report_writes_skipped: AtomicU64,
    pub report_write_errors: AtomicU64,
    pub restores: AtomicU64,
    pub tcp_count_errors: AtomicU64,
    pub watch_errors: AtomicU64,
    pub ready: AtomicBool,
    gauges: Mutex<Gauges>,
}

#[derive(Default)]
struct Gauges {
    tcp: Option<(StateCounts, StateCounts)>,
    keys: Vec<(KeyState, u64)>,
}

const KEY_STATES: [KeyState; 8] = [
    KeyState::Applied,
    KeyState::DryRun,
    KeyState::Unsupported,
    KeyState::Invalid,
    KeyState::Denied,
    KeyState::Overridden,
    KeyState::Failed,
    KeyState::Restored,
];

impl AgentMetrics {
    pub fn set_tcp(&self, ipv4: StateCounts, ipv6: StateCounts) {
        if let Ok(mut g) = self.gauges.lock() {
            g.tcp = Some((ipv4, ipv6));
        }
    }

    pub fn set_key_states(&self, states: impl IntoIterator<Item = KeyState>) {
        let states: Vec<KeyState> = states.into_iter().collect();
        let counts = KEY_STATES
            .iter()
            .map(|s| (*s, states.iter().filter(|x| *x == s).count() as u64))
            .collect();
        if let Ok(mut g) = self.gauges.lock() {
            g.keys = counts;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            &mut out,
            "nodetune_agent_passes_total",
            "Reconcile passes run.",
            &self.passes,
        );
        counter(
            &mut out,
            "nodetune_agent_drift_corrections_total",
            "Keys found changed behind the agent's back and written again.",
            &self.drift_corrections,
        );
        counter(
            &mut out,
            "nodetune_agent_report_writes_total",
            "NodeTuningReport writes.",
            &self.report_writes,
        );
        counter(
            &mut out,
            "nodetune_agent_report_writes_skipped_total",
            "Passes whose report was unchanged and not yet due for a heartbeat.",
            &self.report_writes_skipped,
        );
        counter(
            &mut out,
            "nodetune_agent_report_write_errors_total",
            "Failed NodeTuningReport writes.",
            &self.report_write_errors,
        );
        counter(
            &mut out,
            "nodetune_agent_restores_total",
            "Original values put back.",
            &self.restores,
        );
        counter(
            &mut out,
            "nodetune_agent_tcp_count_errors_total",
            "Failed TCP socket counts.",
            &self.tcp_count_errors,
        );
        counter(
            &mut out,
            "nodetune_agent_watch_errors_total",
            "Failed watches of profiles or the node (retried with backoff).",
            &self.watch_errors,
        );
        let _ = writeln!(
            out,
            "# HELP nodetune_agent_ready Whether the first apply and report succeeded.\n# TYPE nodetune_agent_ready gauge\nnodetune_agent_ready {}",
            u8::from(self.ready.load(Ordering::Relaxed))
        );
        let Ok(g) = self.gauges.lock() else {
            return out;
        };
        if let Some((v4, v6)) = &g.tcp {
            out.push_str("# HELP nodetune_tcp_sockets TCP sockets per state and family in the node's network namespace.\n# TYPE nodetune_tcp_sockets gauge\n");
            for (family, counts) in [("ipv4", v4), ("ipv6", v6)] {
                for state in TcpState::ALL {
                    let _ = writeln!(
                        out,
                        "nodetune_tcp_sockets{{family=\"{family}\",state=\"{}\"}} {}",
                        state.as_str(),
                        counts.get(state)
                    );
                }
            }
        }
        out.push_str("# HELP nodetune_sysctl_keys Sysctl keys per result state on this node.\n# TYPE nodetune_sysctl_keys gauge\n");
        for (state, n) in &g.keys {
            let _ = writeln!(out, "nodetune_sysctl_keys{{state=\"{state:?}\"}} {n}");
        }
        out
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
        m.drift_corrections.fetch_add(2, Ordering::Relaxed);
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
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("nodetune_tcp_sockets{"))
                .count(),
            22
        );
    }
}
