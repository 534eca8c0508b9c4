//! `nodetune controller`: the cluster loop.
//!
//! This module is the process wiring: watch caches (reflectors) on profiles, reports, node
//! metadata and the agent DaemonSet, the metrics server, and the Lease election. Only the replica
//! holding the Lease runs [`pass::Leader::lead`]: a debounced pass over the whole state that
//! [`plan`]s the writes (pure: finalizers, the agent DaemonSet from [`render`], node [`labels`],
//! [`rollup`] statuses with their Events, finalizer releases) and [`execute`]s them.
//!
//! A failing API call fails that object only; the pass finishes, then retries with a capped
//! exponential backoff. Objects that do not deserialize are logged and skipped (kube's
//! `DeserializeGuard`), so one bad object cannot stall the watch.
pub mod cache;
pub mod config;
pub(crate) mod error;
pub(crate) mod execute;
pub(crate) mod finalizer;
pub(crate) mod labels;
pub(crate) mod leader;
pub mod metrics;
pub(crate) mod owner;
pub(crate) mod pass;
pub(crate) mod plan;
pub(crate) mod render;
pub mod rollout;
pub mod rollup;
pub(crate) mod store;
pub(crate) mod trigger;
pub(crate) mod untaint;
pub(crate) mod writes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};

pub use config::{ControllerArgs, ControllerContext};
pub use error::ControllerError;
pub use render::MetricsBind;

use crate::api::{NodeTuningProfile, NodeTuningReport};
use crate::http;
use execute::Executor;
use metrics::Metrics;
use pass::{Caches, Leader};

pub use crate::names::CONTROLLER_FIELD_MANAGER as FIELD_MANAGER;

/// Run the controller with the in-cluster (or kubeconfig) client until SIGTERM or Ctrl-C.
pub async fn run(args: ControllerArgs) -> Result<(), ControllerError> {
    let client = crate::watch::client()
        .await
        .map_err(ControllerError::Client)?;
    let shutdown = shutdown_signal()?;
    run_with_client(args, client, shutdown).await
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, ControllerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ControllerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ControllerError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Counts a watch error in the controller's metrics.
fn watch_error(metrics: &Arc<Metrics>) -> impl Fn() + Send + Sync + 'static {
    let m = metrics.clone();
    move || m.error("watch")
}

/// Run against `client` until `shutdown` resolves.
pub async fn run_with_client(
    args: ControllerArgs,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let settings = owner::resolve(args, &client).await;
    let args = &settings.args;
    let identity = args.identity();
    tracing::info!(%identity, namespace = %args.namespace, "starting the nodetune controller");
    let metrics = Arc::new(Metrics::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        shutdown_tx.send_replace(true);
    });

    let (addr, _server) = http::serve(args.metrics_addr, metrics.clone(), stopped(&shutdown_rx))
        .await
        .map_err(|source| ControllerError::Http {
            addr: args.metrics_addr,
            source,
        })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let changed = Arc::new(Notify::new());
    let caches = start_caches(&client, &args.namespace, &metrics, &changed);
    let synced = report_sync(caches.clone(), metrics.clone());

    let (leader_tx, leader_rx) = watch::channel(false);
    let elector = leader::Elector::new(
        client.clone(),
        args.lease_namespace(),
        &args.leader.lease_name,
        &identity,
    );
    let elector_task = tokio::spawn(elector.run(leader_tx, stopped(&shutdown_rx)));

    let client_for_untaint = client.clone();
    let leader = Leader {
        executor: executor(client, &args.namespace, identity, metrics.clone()),
        settings,
        caches,
        synced,
        metrics: metrics.clone(),
        changed,
        untaint: untaint::Untainter::new(Api::all(client_for_untaint)),
    };
    lead_while_elected(&leader, leader_rx, shutdown_rx, &metrics).await;
    tracing::info!("shutting down");
    // Let the elector hand the Lease back so a standby takes over at once.
    let _ = tokio::time::timeout(Duration::from_secs(5), elector_task).await;
    Ok(())
}

/// Resolves once shutdown is signalled on `rx`.
fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// The watch caches of profiles, reports (digests), nodes (metadata only, labels kept) and the
/// agent DaemonSet; each wakes `changed` on an event.
fn start_caches(
    client: &Client,
    namespace: &str,
    metrics: &Arc<Metrics>,
    changed: &Arc<Notify>,
) -> Caches {
    let cfg = crate::watch::config();
    Caches {
        profiles: crate::watch::reflect(
            watcher(
                Api::<DeserializeGuard<NodeTuningProfile>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "profiles",
            watch_error(metrics),
        ),
        reports: store::watch_digests(
            watcher(
                Api::<DeserializeGuard<NodeTuningReport>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "reports",
            watch_error(metrics),
            |r: &DeserializeGuard<NodeTuningReport>| report_name(r),
            report_digest(metrics.clone()),
            // A change of standing starts a pass at once; telemetry waits (see trigger).
            |old, new| trigger::report_change(old, new) == trigger::Change::Standing,
        ),
        // Metadata only (labels): `Api<PartialObjectMeta<_>>` asks for PartialObjectMetadata
        // (kube's `metadata_watcher` is deprecated for this).
        nodes: store::watch_digests(
            watcher(
                Api::<kube::api::PartialObjectMeta<Node>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "nodes",
            watch_error(metrics),
            |n: &kube::api::PartialObjectMeta<Node>| n.metadata.name.as_deref(),
            |n, names: &mut cache::Interner| store::Digested::Keep(cache::node_digest(n, names)),
            // Node changes (labels, most often our own agent label echoed back) go with the
            // debounce, as before; nothing waits on this store's urgent changes.
            |_, _| false,
        ),
        // Metadata only: a pass reads the DaemonSet's generation, not its pod template.
        daemonsets: crate::watch::reflect(
            watcher(
                Api::<kube::api::PartialObjectMeta<DaemonSet>>::namespaced(
                    client.clone(),
                    namespace,
                ),
                cfg.fields(&format!("metadata.name={}", render::DAEMONSET_NAME)),
            )
            .default_backoff(),
            changed.clone(),
            "daemonsets",
            watch_error(metrics),
        ),
    }
}

/// A report's name, whether or not it deserialized.
fn report_name(r: &DeserializeGuard<NodeTuningReport>) -> Option<&str> {
    match &r.0 {
        Ok(r) => r.metadata.name.as_deref(),
        Err(e) => e.metadata.name.as_deref(),
    }
}

/// Reduces a report to its digest. One that does not deserialize is logged, counted and kept
/// as absent (its node is pending), so one bad object cannot stall the others.
fn report_digest(
    metrics: Arc<Metrics>,
) -> impl Fn(
    &DeserializeGuard<NodeTuningReport>,
    &mut cache::Interner,
) -> store::Digested<cache::ReportDigest>
+ Send
+ 'static {
    move |r, names| match &r.0 {
        Ok(r) => match cache::ReportDigest::of(r, names) {
            Some(d) => store::Digested::Keep(d),
            None => store::Digested::Drop,
        },
        Err(e) => {
            let name = e.metadata.name.as_deref().unwrap_or_default();
            metrics.error("invalid_object");
            tracing::warn!(kind = "NodeTuningReport", name, error = %e.error, "skipping an object that does not deserialize");
            store::Digested::Drop
        }
    }
}

/// Waits for every cache's first listing and says so on the returned channel (and in the
/// readiness metric). The only waiter on the stores' readiness: kube-runtime's
/// `wait_until_ready` wakes just the last task that polled it, so a second waiter (the leader
/// loop) could sleep forever. Everyone else watches the channel.
fn report_sync(caches: Caches, metrics: Arc<Metrics>) -> watch::Receiver<bool> {
    let (synced_tx, synced) = watch::channel(false);
    tokio::spawn(async move {
        let ok = caches.profiles.wait_until_ready().await.is_ok()
            && caches.reports.wait_until_ready().await.is_ok()
            && caches.nodes.wait_until_ready().await.is_ok()
            && caches.daemonsets.wait_until_ready().await.is_ok();
        metrics.set_ready(ok);
        tracing::info!(synced = ok, "watch caches");
        synced_tx.send_replace(ok);
    });
    synced
}

/// The API handles (and Event recorder) a leader writes through.
fn executor(client: Client, namespace: &str, identity: String, metrics: Arc<Metrics>) -> Executor {
    Executor {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity),
            },
        ),
        profiles: Api::all(client.clone()),
        nodes: Api::all(client.clone()),
        daemonsets: Api::namespaced(client, namespace),
        metrics,
    }
}

/// Runs the reconcile loop while this replica holds the lease, stands by while it does not,
/// until shutdown.
async fn lead_while_elected(
    leader: &Leader,
    mut elected: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    metrics: &Metrics,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !*elected.borrow_and_update() {
            metrics.set_leader(false);
            tokio::select! {
                _ = elected.changed() => continue,
                _ = shutdown.changed() => continue,
            }
        }
        metrics.set_leader(true);
        tracing::info!("leading: running the reconcile loop");
        let mut lost = elected.clone();
        tokio::select! {
            _ = leader.lead() => {}
            _ = lost.wait_for(|v| !*v) => {
                // Standby, not exit: the caches stay warm and nothing in memory outlives the
                // term (`lead` starts from scratch next time). In-flight writes are dropped.
                tracing::warn!("lost the leader lease: stopping work, back to standby");
            }
            _ = shutdown.changed() => {}
        }
        metrics.set_leader(false);
    }
}
