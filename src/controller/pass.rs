//! The leader's loop: snapshot the caches, [`plan`](super::plan::plan) the pass, execute it,
//! then wait for a change, the plan's wake-up, or the backoff after errors, and hold the next
//! pass as [`super::trigger`] says (at once for a report's standing, debounced otherwise).
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use tokio::sync::{Notify, watch};

use super::ControllerError;
use super::cache::ReportDigest;
use super::execute::Executor;
use super::labels::NodeLabels;
use super::metrics::Metrics;
use super::plan::{self, LiveDaemonSet, Snapshot, TermMemory};
use super::render::DAEMONSET_NAME;
use super::store::DigestStore;
use super::trigger::{self, Change};
use crate::api::NodeTuningProfile;
use crate::backoff::Backoff;

/// Retries after failed passes: doubling from 1 s, capped at 60 s.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Invalid objects remembered (so each is logged once per version) before the memory is reset.
const MAX_WARNED: usize = 10_000;

/// The caches the pass reads.
#[derive(Clone)]
pub struct Caches {
    pub profiles: Store<DeserializeGuard<NodeTuningProfile>>,
    /// By node name.
    pub reports: DigestStore<ReportDigest>,
    /// Node labels by node name.
    pub nodes: DigestStore<super::cache::NodeDigest>,
    /// Metadata only: its generation is all a pass reads.
    pub daemonsets: Store<kube::api::PartialObjectMeta<DaemonSet>>,
}

/// What the loop needs besides the executor.
pub struct Leader {
    pub settings: super::ControllerContext,
    pub caches: Caches,
    /// True once every cache has its initial list.
    pub synced: watch::Receiver<bool>,
    pub changed: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pub executor: Executor,
    /// The startup taint on nodes no profile selects.
    pub untaint: super::untaint::Untainter,
}

/// Objects that did not deserialize, already logged: (kind/name, resourceVersion).
#[derive(Default)]
struct LoggedInvalid(BTreeSet<(String, String)>);

impl Leader {
    /// Passes until the future is dropped (leadership lost or shutdown). Starts from an empty
    /// memory: nothing of a previous term is trusted.
    pub async fn lead(&self) {
        if self.synced.clone().wait_for(|s| *s).await.is_err() {
            tracing::error!("the watch caches never synced");
            return;
        }
        let mut memory = TermMemory::default();
        let mut warned = LoggedInvalid::default();
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        // When the last pass that took in a standing change started (see `trigger`).
        let mut standing_pass: Option<Instant> = None;
        loop {
            let started = Instant::now();
            if self.caches.reports.urgent_pending() {
                standing_pass = Some(started);
            }
            let (wake_in, errors) = self.pass(&mut memory, &mut warned).await;
            self.metrics.reconciled(started.elapsed());
            let wait = if errors.is_empty() {
                backoff.reset();
                wake_in
            } else {
                for e in &errors {
                    self.metrics.error(e.metric_label());
                    if e.is_conflict() {
                        tracing::debug!(error = %e, "conflict, retrying on fresh data");
                    } else {
                        tracing::warn!(error = %e, "reconcile");
                    }
                }
                backoff.next_delay().min(wake_in)
            };
            tokio::select! {
                _ = self.changed.notified(), if errors.is_empty() => {}
                _ = self.caches.reports.urgent_change(), if errors.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            self.hold(standing_pass).await;
        }
    }

    /// Coalesces changes before the next pass ([`trigger::hold`]): a standing change goes at
    /// once (at most once per debounce), telemetry waits for the debounce, and a standing
    /// change arriving meanwhile cuts that wait short.
    async fn hold(&self, standing_pass: Option<Instant>) {
        let debounce = self.settings.args.timing.debounce;
        let since = || standing_pass.map(|t| t.elapsed());
        let pending = if self.caches.reports.urgent_pending() {
            Change::Standing
        } else {
            Change::Telemetry
        };
        let held = trigger::hold(pending, since(), debounce);
        tokio::select! {
            _ = tokio::time::sleep(held) => {}
            _ = self.caches.reports.urgent_change(), if pending == Change::Telemetry => {
                tokio::time::sleep(trigger::hold(Change::Standing, since(), debounce)).await;
            }
        }
    }

    /// One pass. Returns when the next one is due at the latest, and the errors met.
    async fn pass(
        &self,
        memory: &mut TermMemory,
        warned: &mut LoggedInvalid,
    ) -> (Duration, Vec<ControllerError>) {
        if warned.0.len() > MAX_WARNED {
            warned.0.clear();
        }
        // The report changes this pass takes in: their latency ends at the status patches sent.
        let seen = self.caches.reports.take_changed();
        let profile_objs = self.caches.profiles.state();
        let mut profiles = valid(&profile_objs, "NodeTuningProfile", warned, &self.metrics);
        profiles.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let reports = self.caches.reports.snapshot();
        // Borrowed from the cache for this pass, not cloned: at 20,000 nodes a copy of every
        // node's labels per pass was hundreds of thousands of allocations.
        let node_digests = self.caches.nodes.snapshot();
        let nodes: NodeLabels = node_digests
            .iter()
            .map(|(name, d)| (Cow::Borrowed(&**name), Cow::Borrowed(&d.labels)))
            .collect();
        let daemonset = self
            .caches
            .daemonsets
            .state()
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(DAEMONSET_NAME))
            .map_or(LiveDaemonSet::Absent, |d| LiveDaemonSet::Present {
                generation: d.metadata.generation,
            });
        self.metrics.set_profiles(profiles.len());
        let assignments = super::rollout::wiring::assignments_of(
            node_digests.iter().map(|(n, d)| (&**n, &d.revisions)),
        );
        self.untaint.sweep(&profiles, &nodes).await;
        // The Node's own Ready condition of the few nodes soaking a revision (not cached).
        let soaking = super::rollout::node_ready::soaking(&profiles, |name| {
            memory.statuses.get(name).map(|w| &w.status)
        });
        let not_ready = super::rollout::node_ready::read(&self.executor.nodes, &soaking).await;
        let snapshot = Snapshot {
            profiles,
            reports,
            nodes,
            daemonset,
            assignments,
            not_ready,
            now: Timestamp::now(),
        };
        match plan::plan(&self.settings, &snapshot, memory) {
            Ok(plan) => {
                let wake_in = plan.wake_in;
                (
                    wake_in,
                    self.executor.execute_seen(plan, memory, seen).await,
                )
            }
            Err(source) => (
                plan::RESYNC,
                vec![ControllerError::Serialize {
                    what: "DaemonSet",
                    source,
                }],
            ),
        }
    }
}

/// The objects of a cache snapshot that deserialized; invalid ones are logged once per
/// resourceVersion. Borrows from the snapshot: reports are many and need no copy.
fn valid<'a, K: kube::Resource>(
    objects: &'a [Arc<DeserializeGuard<K>>],
    kind: &str,
    warned: &mut LoggedInvalid,
    metrics: &Metrics,
) -> Vec<&'a K>
where
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut out = Vec::new();
    for obj in objects {
        match &obj.0 {
            Ok(k) => out.push(k),
            Err(e) => {
                let name = e.metadata.name.as_deref().unwrap_or_default();
                let key = (
                    format!("{kind}/{name}"),
                    e.metadata.resource_version.clone().unwrap_or_default(),
                );
                if warned.0.insert(key) {
                    metrics.error("invalid_object");
                    tracing::warn!(kind, name, error = %e.error, "skipping an object that does not deserialize");
                }
            }
        }
    }
    out
}
