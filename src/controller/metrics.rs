//! Controller metrics, encoded by `prometheus-client`. Labels are bounded (error kinds), never
//! object names.
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the reconcile duration histogram.
pub const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) of the controller's own latency (a report's change of standing seen →
/// status patch sent; see `trigger` for when a pass starts) and of a status patch's round trip:
/// fine enough below 100 ms to tell controller time from API-server time.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    /// [`super::ControllerError::metric_label`] or a fixed kind such as `watch`.
    kind: &'static str,
}

/// A rollout step (`EventReason::as_str` of the rollout's Events): five values.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    step: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_duration: Histogram,
    /// From the first report change a pass took in to each status patch it sent.
    report_to_patch: Histogram,
    /// A status patch's round trip to the API server (answered ones).
    status_patch_duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    rollout_steps: Family<RolloutLabels, Counter>,
    status_writes: Counter,
    status_writes_skipped: Counter,
    nodes_labelled: Counter,
    nodes_unlabelled: Counter,
    daemonset_applies: Counter,
    finalizers_released: Counter,
    finalizers_timed_out: Counter,
    profiles: Gauge,
    is_leader: Gauge,
    caches_ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Registry::default(),
            reconciles: Counter::default(),
            reconcile_duration: Histogram::new(BUCKETS),
            report_to_patch: Histogram::new(LATENCY_BUCKETS),
            status_patch_duration: Histogram::new(LATENCY_BUCKETS),
            errors: Family::default(),
            rollout_steps: Family::default(),
            status_writes: Counter::default(),
            status_writes_skipped: Counter::default(),
            nodes_labelled: Counter::default(),
            nodes_unlabelled: Counter::default(),
            daemonset_applies: Counter::default(),
            finalizers_released: Counter::default(),
            finalizers_timed_out: Counter::default(),
            profiles: Gauge::default(),
            is_leader: Gauge::default(),
            caches_ready: Gauge::default(),
        };
        m.registered()
    }
}

impl Metrics {
    /// Registers every family under its exported name. Counters are registered without
    /// `_total`: the encoder appends it.
    /// Registers every metric, in the order the exposition lists them.
    fn registered(mut self) -> Self {
        self.register_counters();
        self.register_histograms();
        self.register_gauges();
        self
    }

    /// The counters, plain and by label.
    fn register_counters(&mut self) {
        let r = &mut self.registry;
        let counters = [
            (
                "reconciles",
                "Reconcile passes over the whole state",
                &self.reconciles,
            ),
            (
                "status_writes",
                "Profile status patches sent",
                &self.status_writes,
            ),
            (
                "status_writes_skipped",
                "Profile status patches skipped: only timestamps changed, or only TCP totals within the telemetry interval",
                &self.status_writes_skipped,
            ),
            (
                "nodes_labelled",
                "Nodes given the agent label",
                &self.nodes_labelled,
            ),
            (
                "nodes_unlabelled",
                "Nodes whose agent label was removed",
                &self.nodes_unlabelled,
            ),
            (
                "daemonset_applies",
                "Server-side applies of the agent DaemonSet",
                &self.daemonset_applies,
            ),
            (
                "finalizers_released",
                "Profile finalizers released",
                &self.finalizers_released,
            ),
            (
                "finalizers_timed_out",
                "Profile finalizers released after the timeout with nodes still holding the profile",
                &self.finalizers_timed_out,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(format!("nodetune_controller_{name}"), help, counter.clone());
        }
        r.register(
            "nodetune_controller_errors",
            "Errors by kind",
            self.errors.clone(),
        );
        r.register(
            "nodetune_controller_rollout_steps",
            "Staged rollout steps over all profiles: RevisionCreated, RolloutWave, \
             RolloutComplete, RolloutRolledBack, RolloutPaused",
            self.rollout_steps.clone(),
        );
    }

    fn register_histograms(&mut self) {
        let r = &mut self.registry;
        r.register_with_unit(
            "nodetune_controller_reconcile_duration",
            "Duration of one reconcile pass",
            Unit::Seconds,
            self.reconcile_duration.clone(),
        );
        r.register_with_unit(
            "nodetune_controller_report_to_status_patch",
            "The controller's own latency: from the oldest NodeTuningReport change of standing (generation acknowledged, key failing or overridden, originals held, TIME_WAIT pressure, contested key) applied to its cache and not yet taken by a pass, to each profile status patch that pass sends (the hold before the pass, its planning and its patch queue included; the API server's and the watch's time before the change was seen, and the patch's round trip, are not in it; telemetry-only passes observe nothing)",
            Unit::Seconds,
            self.report_to_patch.clone(),
        );
        r.register_with_unit(
            "nodetune_controller_status_patch_duration",
            "Round trip of a profile status patch to the API server",
            Unit::Seconds,
            self.status_patch_duration.clone(),
        );
    }

    fn register_gauges(&mut self) {
        let r = &mut self.registry;
        let gauges = [
            (
                "profiles",
                "NodeTuningProfiles in the cache",
                &self.profiles,
            ),
            (
                "is_leader",
                "1 if this replica holds the leader lease",
                &self.is_leader,
            ),
            (
                "caches_ready",
                "1 once every watch cache has synced",
                &self.caches_ready,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(format!("nodetune_controller_{name}"), help, gauge.clone());
        }
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }
    /// A status patch is about to be sent for changes first seen at `seen`: records the
    /// controller's own latency and returns the send time (for [`Self::status_patched`]).
    pub fn status_patch_sending(&self, seen: Option<Instant>) -> Instant {
        let now = Instant::now();
        if let Some(seen) = seen {
            self.report_to_patch
                .observe(now.saturating_duration_since(seen).as_secs_f64());
        }
        now
    }
    /// A status patch was answered after `took`.
    pub fn status_patched(&self, took: Duration) {
        self.status_patch_duration.observe(took.as_secs_f64());
    }
    pub fn error(&self, label: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { kind: label })
            .inc();
    }
    /// Counts one step of a staged rollout (the reason of its Event).
    pub fn rollout_step(&self, step: &'static str) {
        self.rollout_steps
            .get_or_create(&RolloutLabels { step })
            .inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }
    pub fn status_skipped(&self) {
        self.status_writes_skipped.inc();
    }
    pub fn labelled(&self) {
        self.nodes_labelled.inc();
    }
    pub fn unlabelled(&self) {
        self.nodes_unlabelled.inc();
    }
    pub fn daemonset_applied(&self) {
        self.daemonset_applies.inc();
    }
    pub fn finalizer_released(&self, timed_out: bool) {
        self.finalizers_released.inc();
        if timed_out {
            self.finalizers_timed_out.inc();
        }
    }
    pub fn set_profiles(&self, n: usize) {
        self.profiles.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    pub fn set_leader(&self, v: bool) {
        self.is_leader.set(i64::from(v));
    }
    pub fn set_ready(&self, v: bool) {
        self.caches_ready.set(i64::from(v));
    }
    pub fn ready(&self) -> bool {
        self.caches_ready.get() == 1
    }

    /// Prometheus text exposition (format 0.0.4), as `/metrics` serves it to clients that do not
    /// ask for OpenMetrics.
    pub fn render(&self) -> String {
        crate::http::encode(&self.registry, crate::http::Format::Prometheus).unwrap_or_default()
    }
}

impl crate::http::Exporter for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn readiness(&self) -> Result<(), &'static str> {
        if self.ready() {
            Ok(())
        } else {
            Err("watch caches not synced")
        }
    }
}

/// The metric family names `/metrics` shows, e.g. `nodetune_controller_reconciles_total`
/// (histograms by their base name).
pub fn exported_names() -> Vec<String> {
    let m = Metrics::default();
    // A labelled family is on /metrics from its first series on.
    m.error("watch");
    m.rollout_step("RolloutWave");
    crate::http::family_names(&m.registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Format, encode};

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
            text.contains("nodetune_controller_reconcile_duration_seconds_bucket{le=\"0.05\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("nodetune_controller_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("nodetune_controller_reconcile_duration_seconds_count 2\n"));
        assert!(text.contains("nodetune_controller_errors_total{kind=\"kube_api\"} 2\n"));
        assert!(text.contains("nodetune_controller_status_writes_skipped_total 1\n"));
        assert!(text.contains("nodetune_controller_is_leader 1\n"));
        // HELP and TYPE name the counter as its samples do.
        assert!(text.contains(
            "# HELP nodetune_controller_reconciles_total Reconcile passes over the whole state.\n# TYPE nodetune_controller_reconciles_total counter\n"
        ));
        // Every sample line is "name[{labels}] value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("sample");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn openmetrics_has_the_same_samples() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30));
        m.error("watch");
        let om = encode(&m.registry, Format::OpenMetrics).expect("encode");
        assert!(
            om.contains("nodetune_controller_reconciles_total 1\n"),
            "{om}"
        );
        assert!(om.contains("nodetune_controller_errors_total{kind=\"watch\"} 1\n"));
        assert!(om.contains("# UNIT nodetune_controller_reconcile_duration_seconds seconds\n"));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn status_patches_record_the_controllers_own_latency_apart_from_the_round_trip() {
        let m = Metrics::default();
        let seen = Instant::now() - Duration::from_millis(30);
        let sent = m.status_patch_sending(Some(seen));
        assert!(sent >= seen + Duration::from_millis(30));
        m.status_patched(Duration::from_secs(3));
        // A pass that took in no report change (a profile edit) records no latency.
        m.status_patch_sending(None);
        let text = m.render();
        assert!(
            text.contains("nodetune_controller_report_to_status_patch_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "nodetune_controller_status_patch_duration_seconds_bucket{le=\"2.5\"} 0\n"
            )
        );
        assert!(
            text.contains("nodetune_controller_status_patch_duration_seconds_bucket{le=\"5\"} 1\n")
        );
    }

    #[test]
    fn readiness_follows_the_caches() {
        use crate::http::Exporter;
        let m = Metrics::default();
        assert!(m.readiness().is_err());
        m.set_ready(true);
        assert!(m.readiness().is_ok());
        assert!(m.render().contains("nodetune_controller_caches_ready 1\n"));
    }

    #[test]
    fn exported_names_are_the_families_on_metrics() {
        let names = exported_names();
        assert_eq!(
            names,
            [
                "nodetune_controller_reconciles_total",
                "nodetune_controller_status_writes_total",
                "nodetune_controller_status_writes_skipped_total",
                "nodetune_controller_nodes_labelled_total",
                "nodetune_controller_nodes_unlabelled_total",
                "nodetune_controller_daemonset_applies_total",
                "nodetune_controller_finalizers_released_total",
                "nodetune_controller_finalizers_timed_out_total",
                "nodetune_controller_errors_total",
                "nodetune_controller_rollout_steps_total",
                "nodetune_controller_reconcile_duration_seconds",
                "nodetune_controller_report_to_status_patch_seconds",
                "nodetune_controller_status_patch_duration_seconds",
                "nodetune_controller_profiles",
                "nodetune_controller_is_leader",
                "nodetune_controller_caches_ready",
            ]
        );
        // Each one is on /metrics once it has a sample.
        let m = Metrics::default();
        m.error("watch");
        m.rollout_step("RolloutWave");
        let text = m.render();
        for name in &names {
            assert!(
                text.lines().any(|l| l.starts_with(name.as_str())
                    && !l.starts_with('#')
                    && l[name.len()..].starts_with([' ', '{', '_'])),
                "{name} has no sample:\n{text}"
            );
        }
    }
}
