//! `nodetune controller`: the cluster loop.
//!
//! Watch caches (reflectors) on profiles, reports, node metadata and the agent DaemonSet feed one
//! debounced pass over the whole state, run only by the replica holding the leader Lease:
//!
//! 1. add the cleanup finalizer to new profiles;
//! 2. render the agent DaemonSet ([`render`], pure) and server-side apply it when it changed;
//! 3. compute which nodes carry the agent label ([`labels`], pure) and patch the differences;
//! 4. roll the reports up into each profile's status ([`rollup`], pure) and patch `/status` only
//!    when more than timestamps changed, with Events on transitions;
//! 5. release finalizers of deleted profiles once every node restored ([`finalizer`]).
//!
//! A failing API call fails that object only; the pass finishes, then retries with a capped
//! exponential backoff. Objects that do not deserialize are logged and skipped (kube's
//! `DeserializeGuard`), so one bad object cannot stall the watch.
pub mod config;
pub mod error;
pub mod finalizer;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod owner;
pub mod render;
pub mod rollup;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};

pub use config::ControllerArgs;
pub use error::ControllerError;

use crate::api::{NodeTuningProfile, NodeTuningProfileStatus, NodeTuningReport};
use crate::http;
use labels::NodeLabels;
use metrics::Metrics;

/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "nodetune-controller";
/// A full pass runs at least this often even without watch events (finalizer timeouts, drift).
pub const RESYNC: Duration = Duration::from_secs(30);
/// Params of non-apply patches, still attributed to the controller's field manager.
fn manager() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Node label patches in flight at once.
const LABEL_CONCURRENCY: usize = 16;

/// Run the controller with the in-cluster (or kubeconfig) client until SIGTERM or Ctrl-C.
pub async fn run(args: ControllerArgs) -> Result<(), ControllerError> {
    let client = crate::watch::client()
        .await
        .map_err(ControllerError::Client)?;
    let shutdown = shutdown_signal()?;
    run_with_client(args, client, shutdown).await
}

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, ControllerError> {
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

/// The caches the pass reads.
#[derive(Clone)]
struct Caches {
    profiles: Store<DeserializeGuard<NodeTuningProfile>>,
    reports: Store<DeserializeGuard<NodeTuningReport>>,
    nodes: Store<PartialObjectMeta<Node>>,
    daemonsets: Store<DaemonSet>,
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
    let args = owner::resolve(args, &client).await;
    let identity = args.identity();
    tracing::info!(%identity, namespace = %args.namespace, "starting the nodetune controller");
    let metrics = Arc::new(Metrics::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        shutdown_tx.send_replace(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let router_metrics = metrics.clone();
    let router: http::Router = Arc::new(move |path: &str| match path {
        "/metrics" => http::Response::metrics(router_metrics.render()),
        "/healthz" | "/livez" => http::Response::text(200, "ok\n"),
        "/readyz" if router_metrics.ready() => http::Response::text(200, "ok\n"),
        "/readyz" => http::Response::text(503, "watch caches not synced\n"),
        _ => http::Response::text(404, "not found\n"),
    });
    let (addr, _server) = http::serve(args.metrics_addr, router)
        .await
        .map_err(|source| ControllerError::Http {
            addr: args.metrics_addr,
            source,
        })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let changed = Arc::new(Notify::new());
    let cfg = crate::watch::config();
    let caches = Caches {
        profiles: crate::watch::reflect(
            watcher(
                Api::<DeserializeGuard<NodeTuningProfile>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "profiles",
            watch_error(&metrics),
        ),
        reports: crate::watch::reflect(
            watcher(
                Api::<DeserializeGuard<NodeTuningReport>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "reports",
            watch_error(&metrics),
        ),
        nodes: crate::watch::reflect(
            // Metadata only (labels): `Api<PartialObjectMeta<_>>` asks for PartialObjectMetadata.
            watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                cfg.clone(),
            )
            .default_backoff(),
            changed.clone(),
            "nodes",
            watch_error(&metrics),
        ),
        daemonsets: crate::watch::reflect(
            watcher(
                Api::<DaemonSet>::namespaced(client.clone(), &args.namespace),
                cfg.fields(&format!("metadata.name={}", render::DAEMONSET_NAME)),
            )
            .default_backoff(),
            changed.clone(),
            "daemonsets",
            watch_error(&metrics),
        ),
    };
    // The only waiter on the stores' readiness: kube-runtime's `wait_until_ready` wakes just
    // the last task that polled it, so a second waiter (the leader loop) could sleep forever.
    // Everyone else watches `synced`.
    let (synced_tx, synced) = watch::channel(false);
    {
        let (caches, metrics) = (caches.clone(), metrics.clone());
        tokio::spawn(async move {
            let ok = caches.profiles.wait_until_ready().await.is_ok()
                && caches.reports.wait_until_ready().await.is_ok()
                && caches.nodes.wait_until_ready().await.is_ok()
                && caches.daemonsets.wait_until_ready().await.is_ok();
            metrics.set_ready(ok);
            tracing::info!(synced = ok, "watch caches");
            synced_tx.send_replace(ok);
        });
    }

    let (leader_tx, mut leader_rx) = watch::channel(false);
    let elector = leader::Elector::new(
        client.clone(),
        args.lease_namespace(),
        &args.lease_name,
        &identity,
    );
    let elector_task = tokio::spawn(elector.run(leader_tx, stopped(shutdown_rx.clone())));

    let ctx = Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        profiles_api: Api::all(client.clone()),
        nodes_api: Api::all(client.clone()),
        ds_api: Api::namespaced(client, &args.namespace),
        args,
        caches,
        synced,
        metrics: metrics.clone(),
        changed,
    };

    let mut shutdown_rx_main = shutdown_rx.clone();
    loop {
        if *shutdown_rx_main.borrow() {
            break;
        }
        if !*leader_rx.borrow_and_update() {
            metrics.set_leader(false);
            tokio::select! {
                _ = leader_rx.changed() => continue,
                _ = shutdown_rx_main.changed() => continue,
            }
        }
        metrics.set_leader(true);
        tracing::info!("leading: running the reconcile loop");
        let mut lost = leader_rx.clone();
        tokio::select! {
            _ = lead(&ctx) => {}
            _ = lost.wait_for(|v| !*v) => {
                // Standby, not exit: the caches stay warm and nothing in memory outlives the
                // term (`lead` starts from scratch next time). In-flight writes are dropped.
                tracing::warn!("lost the leader lease: stopping work, back to standby");
            }
            _ = shutdown_rx_main.changed() => {}
        }
        metrics.set_leader(false);
    }
    tracing::info!("shutting down");
    // Let the elector hand the Lease back so a standby takes over at once.
    let _ = tokio::time::timeout(Duration::from_secs(5), elector_task).await;
    Ok(())
}

struct Ctx {
    args: ControllerArgs,
    caches: Caches,
    /// True once every cache has its initial list.
    synced: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
    recorder: Recorder,
    profiles_api: Api<NodeTuningProfile>,
    nodes_api: Api<Node>,
    ds_api: Api<DaemonSet>,
}

/// What one leadership term remembers between passes.
#[derive(Default)]
struct Term {
    /// The DaemonSet last applied, and the generation the apiserver gave it.
    applied_ds: Option<(serde_json::Value, Option<i64>)>,
    /// Status written per profile name: (uid, resourceVersion it was computed from, status).
    written: HashMap<String, (Option<String>, Option<String>, NodeTuningProfileStatus)>,
    /// (kind/name, resourceVersion) of invalid objects already logged.
    warned: BTreeSet<(String, String)>,
    failures: u32,
}

/// The leader's loop: wait for caches, then debounced passes forever.
async fn lead(ctx: &Ctx) {
    if ctx.synced.clone().wait_for(|s| *s).await.is_err() {
        tracing::error!("the watch caches never synced");
        return;
    }
    let mut term = Term::default();
    loop {
        let started = Instant::now();
        let (next, errors) = reconcile(ctx, &mut term).await;
        ctx.metrics.reconciled(started.elapsed());
        let wait = if errors.is_empty() {
            term.failures = 0;
            next
        } else {
            for e in &errors {
                ctx.metrics.error(e.metric_label());
                if e.is_conflict() {
                    tracing::debug!(error = %e, "conflict, retrying on fresh data");
                } else {
                    tracing::warn!(error = %e, "reconcile");
                }
            }
            let wait = error::backoff(term.failures);
            term.failures = term.failures.saturating_add(1);
            wait.min(next)
        };
        tokio::select! {
            _ = ctx.changed.notified(), if errors.is_empty() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::time::sleep(ctx.args.debounce).await;
    }
}

/// The objects of a cache snapshot that deserialized; invalid ones are logged once per
/// resourceVersion. Borrows from the snapshot: reports are many and need no copy.
fn valid<'a, K: kube::Resource>(
    objects: &'a [Arc<DeserializeGuard<K>>],
    kind: &str,
    term: &mut Term,
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
                let key = (
                    format!("{kind}/{}", e.metadata.name.as_deref().unwrap_or_default()),
                    e.metadata.resource_version.clone().unwrap_or_default(),
                );
                if term.warned.insert(key) {
                    metrics.error("invalid_object");
                    tracing::warn!(kind, name = e.metadata.name.as_deref().unwrap_or_default(), error = %e.error, "skipping an object that does not deserialize");
                }
            }
        }
    }
    out
}

/// One pass over the whole state. Returns when the next pass is due at the latest, and the
/// errors met (each on one object; the rest of the pass still ran).
async fn reconcile(ctx: &Ctx, term: &mut Term) -> (Duration, Vec<ControllerError>) {
    let mut errors = Vec::new();
    let mut next = RESYNC;
    let now = Timestamp::now();

    let profile_objs = ctx.caches.profiles.state();
    let mut profiles: Vec<NodeTuningProfile> =
        valid(&profile_objs, "NodeTuningProfile", term, &ctx.metrics)
            .into_iter()
            .cloned()
            .collect();
    profiles.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let report_objs = ctx.caches.reports.state();
    let reports: BTreeMap<String, &NodeTuningReport> =
        valid(&report_objs, "NodeTuningReport", term, &ctx.metrics)
            .into_iter()
            .map(|r| (r.name_any(), r))
            .collect();
    let nodes: NodeLabels = ctx
        .caches
        .nodes
        .state()
        .iter()
        .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
        .collect();
    ctx.metrics.set_profiles(profiles.len());

    // 1. Finalizers on live profiles.
    for p in &profiles {
        if finalizer::decide(p, &nodes, &reports, now, ctx.args.finalizer_timeout)
            == finalizer::Decision::Add
            && let Err(e) = finalizer::add(&ctx.profiles_api, p).await
        {
            errors.push(ControllerError::api("add_finalizer", p.name_any(), e));
        }
    }

    // 2. The agent DaemonSet. Deleting profiles keep their tolerations so their nodes' agents
    // stay to restore.
    let tolerations = render::toleration_union(&ctx.args.agent_default_tolerations.0, &profiles);
    if let Err(e) = apply_daemonset(ctx, term, tolerations).await {
        errors.push(e);
    }

    // 3. Node labels.
    let plan = labels::plan_labels(&nodes, &profiles, &reports);
    for (profile, e) in &plan.selector_errors {
        tracing::debug!(%profile, error = %e, "selector cannot be evaluated");
    }
    errors.extend(apply_labels(ctx, &plan).await);

    // 4. Status. Forget what was written for profiles that are gone.
    let live: BTreeSet<String> = profiles.iter().map(|p| p.name_any()).collect();
    term.written.retain(|name, _| live.contains(name));
    if term.warned.len() > 10_000 {
        term.warned.clear();
    }
    for p in profiles
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        if let Err(e) = write_status(ctx, term, p, &nodes, &reports, now).await {
            errors.push(e);
        }
    }

    // 5. Finalizers of deleted profiles.
    for p in profiles
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
    {
        match finalizer::decide(p, &nodes, &reports, now, ctx.args.finalizer_timeout) {
            finalizer::Decision::Wait {
                nodes: holdouts,
                remaining,
            } => {
                tracing::debug!(profile = %p.name_any(), nodes = holdouts.len(), "waiting for nodes to restore");
                next = next.min(remaining + Duration::from_secs(1));
            }
            finalizer::Decision::Release => {
                if let Err(e) = release(
                    ctx,
                    p,
                    false,
                    "every node restored or let go of the profile".into(),
                )
                .await
                {
                    errors.push(e);
                }
            }
            finalizer::Decision::ReleaseTimedOut { nodes: holdouts } => {
                let note = format!(
                    "released after {} although {} node(s) still list the profile (e.g. {})",
                    config::format_duration(ctx.args.finalizer_timeout),
                    holdouts.len(),
                    holdouts
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Err(e) = release(ctx, p, true, note).await {
                    errors.push(e);
                }
            }
            finalizer::Decision::Add | finalizer::Decision::Nothing => {}
        }
    }
    (next, errors)
}

async fn apply_daemonset(
    ctx: &Ctx,
    term: &mut Term,
    tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
) -> Result<(), ControllerError> {
    let ds = render::render_daemonset(&ctx.args, tolerations);
    let rendered = serde_json::to_value(&ds).map_err(|source| ControllerError::Serialize {
        what: "DaemonSet",
        source,
    })?;
    let live_generation = ctx
        .caches
        .daemonsets
        .state()
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(render::DAEMONSET_NAME))
        .map(|d| d.metadata.generation);
    let up_to_date = match (&term.applied_ds, live_generation) {
        // Same content as last applied, and nobody changed the object since.
        (Some((last, generation)), Some(live)) => *last == rendered && *generation == live,
        _ => false,
    };
    if up_to_date {
        return Ok(());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = ctx
        .ds_api
        .patch(render::DAEMONSET_NAME, &params, &Patch::Apply(&ds))
        .await
        .map_err(|e| ControllerError::api("apply_daemonset", render::DAEMONSET_NAME, e))?;
    tracing::info!(generation = ?applied.metadata.generation, "applied the agent DaemonSet");
    ctx.metrics.daemonset_applied();
    term.applied_ds = Some((rendered, applied.metadata.generation));
    Ok(())
}

async fn apply_labels(ctx: &Ctx, plan: &labels::LabelPlan) -> Vec<ControllerError> {
    let add = plan.label.iter().map(|n| (n.clone(), true));
    let remove = plan.unlabel.iter().map(|n| (n.clone(), false));
    futures::stream::iter(add.chain(remove))
        .map(|(node, on)| async move {
            let result = if on {
                // Server-side apply of this one label: the controller owns exactly that field.
                let patch = json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node, "labels": {render::AGENT_NODE_LABEL: "true"}},
                });
                ctx.nodes_api
                    .patch(
                        &node,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
            } else {
                // A merge patch with null removes the label whoever set it (an SSA apply without
                // it would only drop it while this manager is its sole owner).
                let patch = json!({"metadata": {"labels": {render::AGENT_NODE_LABEL: null}}});
                ctx.nodes_api
                    .patch(&node, &manager(), &Patch::Merge(&patch))
                    .await
            };
            match result {
                Ok(_) => {
                    if on {
                        ctx.metrics.labelled();
                    } else {
                        ctx.metrics.unlabelled();
                    }
                    tracing::info!(%node, agent = on, "node label");
                    Ok(())
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                Err(e) => Err(ControllerError::api(
                    if on { "label_node" } else { "unlabel_node" },
                    node,
                    e,
                )),
            }
        })
        .buffer_unordered(LABEL_CONCURRENCY)
        .filter_map(|r| futures::future::ready(r.err()))
        .collect()
        .await
}

async fn write_status(
    ctx: &Ctx,
    term: &mut Term,
    p: &NodeTuningProfile,
    nodes: &NodeLabels,
    reports: &BTreeMap<String, &NodeTuningReport>,
    now: Timestamp,
) -> Result<(), ControllerError> {
    let name = p.name_any();
    // Our last write, until the cache has caught up with it.
    let previous = match term.written.get(&name) {
        Some((uid, rv, status)) if *uid == p.metadata.uid && *rv == p.metadata.resource_version => {
            Some(status)
        }
        _ => p.status.as_ref(),
    };
    let status = rollup::rollup(p, previous, nodes, reports, now);
    if !rollup::status_changed(previous, &status) {
        ctx.metrics.status_skipped();
        return Ok(());
    }
    let patch = json!({ "status": status });
    ctx.profiles_api
        .patch_status(&name, &manager(), &Patch::Merge(&patch))
        .await
        .map_err(|e| ControllerError::api("patch_status", name.clone(), e))?;
    ctx.metrics.status_written();
    for t in rollup::transitions(previous, &status) {
        publish(ctx, p, t.warning, t.reason, "Rollup", t.note).await;
    }
    term.written.insert(
        name,
        (
            p.metadata.uid.clone(),
            p.metadata.resource_version.clone(),
            status,
        ),
    );
    Ok(())
}

async fn release(
    ctx: &Ctx,
    p: &NodeTuningProfile,
    timed_out: bool,
    note: String,
) -> Result<(), ControllerError> {
    if timed_out {
        publish(ctx, p, true, "FinalizerTimeout", "Release", note.clone()).await;
    }
    finalizer::remove(&ctx.profiles_api, p)
        .await
        .map_err(|e| ControllerError::api("remove_finalizer", p.name_any(), e))?;
    ctx.metrics.finalizer_released(timed_out);
    tracing::info!(profile = %p.name_any(), timed_out, "released the cleanup finalizer");
    if !timed_out {
        publish(ctx, p, false, "Restored", "Release", note).await;
    }
    Ok(())
}

/// Publish an Event about `p`; a failure is logged and counted, never fatal.
async fn publish(
    ctx: &Ctx,
    p: &NodeTuningProfile,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(rollup::truncate(note, 1000)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &p.object_ref(&())).await {
        ctx.metrics.error("event");
        tracing::warn!(error = %e, reason, "publishing an event failed");
    }
}
