//! Controller metrics in Prometheus text format. Labels are bounded (error kinds, write kinds),
//! never object names.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the reconcile duration histogram.
pub const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    duration_micros: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    status_writes: AtomicU64,
    status_writes_skipped: AtomicU64,
    nodes_labelled: AtomicU64,
    nodes_unlabelled: AtomicU64,
    daemonset_applies: AtomicU64,
    finalizers_released: AtomicU64,
    finalizers_timed_out: AtomicU64,
    profiles: AtomicU64,
    is_leader: AtomicBool,
    caches_ready: AtomicBool,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        inc(&self.reconciles, 1);
        inc(
            &self.duration_micros,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                inc(bucket, 1);
            }
        }
    }
    pub fn error(&self, label: &'static str) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(label).or_default() += 1;
        }
    }
    pub fn status_written(&self) {
        inc(&self.status_writes, 1);
    }
    pub fn status_skipped(&self) {
        inc(&self.status_writes_skipped, 1);
    }
    pub fn labelled(&self) {
        inc(&self.nodes_labelled, 1);
    }
    pub fn unlabelled(&self) {
        inc(&self.nodes_unlabelled, 1);
    }
    pub fn daemonset_applied(&self) {
        inc(&self.daemonset_applies, 1);
    }
    pub fn finalizer_released(&self, timed_out: bool) {
        inc(&self.finalizers_released, 1);
        if timed_out {
            inc(&self.finalizers_timed_out, 1);
        }
    }
    pub fn set_profiles(&self, n: usize) {
        self.profiles.store(n as u64, Ordering::Relaxed);
    }
    pub fn set_leader(&self, v: bool) {
        self.is_leader.store(v, Ordering::Relaxed);
    }
    pub fn set_ready(&self, v: bool) {
        self.caches_ready.store(v, Ordering::Relaxed);
    }
    pub fn ready(&self) -> bool {
        self.caches_ready.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP nodetune_controller_{name} {help}\n# TYPE nodetune_controller_{name} counter"
            );
            let _ = writeln!(out, "nodetune_controller_{name} {v}");
        };
        counter(
            "reconciles_total",
            "Reconcile passes over the whole state.",
            get(&self.reconciles),
        );
        counter(
            "status_writes_total",
            "Profile status patches sent.",
            get(&self.status_writes),
        );
        counter(
            "status_writes_skipped_total",
            "Profile status patches skipped because only timestamps changed.",
            get(&self.status_writes_skipped),
        );
        counter(
            "nodes_labelled_total",
            "Nodes given the agent label.",
            get(&self.nodes_labelled),
        );
        counter(
            "nodes_unlabelled_total",
            "Nodes whose agent label was removed.",
            get(&self.nodes_unlabelled),
        );
        counter(
            "daemonset_applies_total",
            "Server-side applies of the agent DaemonSet.",
            get(&self.daemonset_applies),
        );
        counter(
            "finalizers_released_total",
            "Profile finalizers released.",
            get(&self.finalizers_released),
        );
        counter(
            "finalizers_timed_out_total",
            "Profile finalizers released after the timeout with nodes still holding the profile.",
            get(&self.finalizers_timed_out),
        );

        out.push_str("# HELP nodetune_controller_errors_total Errors by kind.\n# TYPE nodetune_controller_errors_total counter\n");
        if let Ok(errors) = self.errors.lock() {
            for (label, n) in errors.iter() {
                let _ = writeln!(
                    out,
                    "nodetune_controller_errors_total{{kind=\"{label}\"}} {n}"
                );
            }
        }

        let name = "nodetune_controller_reconcile_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Duration of one reconcile pass.\n# TYPE {name} histogram"
        );
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.reconciles);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            get(&self.duration_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");

        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP nodetune_controller_{name} {help}\n# TYPE nodetune_controller_{name} gauge"
            );
            let _ = writeln!(out, "nodetune_controller_{name} {v}");
        };
        gauge(
            "profiles",
            "NodeTuningProfiles in the cache.",
            get(&self.profiles),
        );
        gauge(
            "is_leader",
            "1 if this replica holds the leader lease.",
            u64::from(self.is_leader.load(Ordering::Relaxed)),
        );
        gauge(
            "caches_ready",
            "1 once every watch cache has synced.",
            u64::from(self.ready()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30));
        m.reconciled(Duration::from_secs(20));
        m.error("kube_api");
        m.error("kube_api");
        m.status_skipped();
        m.set_leader(true);
        let text = m.render();
        assert!(text.contains("nodetune_controller_reconciles_total 2\n"));
        assert!(
            text.contains("nodetune_controller_reconcile_duration_seconds_bucket{le=\"0.05\"} 1\n")
        );
        assert!(
            text.contains("nodetune_controller_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("nodetune_controller_errors_total{kind=\"kube_api\"} 2\n"));
        assert!(text.contains("nodetune_controller_status_writes_skipped_total 1\n"));
        assert!(text.contains("nodetune_controller_is_leader 1\n"));
        // Every sample line is "name[{labels}] value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("sample");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
