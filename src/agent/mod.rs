//! `nodetune agent`: the node loop. Watches its Node and every NodeTuningProfile, applies the
//! merged sysctls (see [`tuner`]), counts TCP sockets and writes the node's NodeTuningReport.
//!
//! The kernel side never waits for the API: once the first full view of profiles and labels is
//! in, each pass works from the local caches, so the node stays tuned through API outages and
//! reports catch up when the API is back.
pub mod config;
pub mod metrics;
pub mod report;
pub mod tuner;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

pub use config::AgentArgs;
use metrics::AgentMetrics;
use report::{Change, PassFacts};

use crate::api::{
    NodeTuningProfile, NodeTuningReport, NodeTuningReportSpec, NodeTuningReportStatus,
};
use crate::http::{self, Response, Router};
use crate::sysctl::{Ledger, LedgerError, SysctlFs};
use crate::tcpstat;
use crate::watch::reflect;

/// Field manager of every agent write.
pub const FIELD_MANAGER: &str = "nodetune-agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

/// Longest a report write may take before the pass gives up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait before retrying a failed report write.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// After a watch event, wait this long for more before acting, so a burst is one pass.
const DEBOUNCE: Duration = Duration::from_millis(300);

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let fs = SysctlFs::new(&args.proc_sys);
    let loaded = Ledger::load(&args.state_dir)?;
    let mut sticky_warnings = Vec::new();
    if let Some(aside) = &loaded.set_aside {
        let msg = format!(
            "the ledger was unreadable ({}) and was moved to {}; the originals it held must be checked by hand",
            aside.reason,
            aside.moved_to.display()
        );
        tracing::error!("{msg}");
        sticky_warnings.push(msg);
    }
    let mut ledger = loaded.ledger;
    let kernel_release = std::fs::read_to_string(args.proc_sys.join("kernel/osrelease"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();

    let metrics = Arc::new(AgentMetrics::default());
    let router: Router = {
        let m = metrics.clone();
        Arc::new(move |path| match path {
            "/metrics" => Response::metrics(m.render()),
            "/healthz" => Response::text(200, "ok\n"),
            "/readyz" if m.ready.load(Ordering::Relaxed) => Response::text(200, "ready\n"),
            "/readyz" => Response::text(503, "not ready\n"),
            _ => Response::text(404, "not found\n"),
        })
    };
    let (bound, _server) = http::serve(args.metrics_addr, router)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: args.metrics_addr,
            source,
        })?;
    tracing::info!(node = %args.node_name, metrics = %bound, "agent starting");

    let client = Client::try_default().await.map_err(AgentError::Client)?;
    let changed = Arc::new(Notify::new());
    // A profile that does not deserialize is skipped with a warning instead of stalling the
    // watch (and with it every other profile).
    let profiles = reflect(
        watcher(
            Api::<DeserializeGuard<NodeTuningProfile>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
        changed.clone(),
        "profiles",
        watch_error(&metrics),
    );
    let nodes = reflect(
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
        )
        .default_backoff(),
        changed.clone(),
        "node",
        watch_error(&metrics),
    );
    // Acting before both views are complete could restore keys a profile still wants.
    let (Ok(()), Ok(())) = (
        profiles.wait_until_ready().await,
        nodes.wait_until_ready().await,
    ) else {
        return Err(AgentError::WatchEnded("initial"));
    };
    tracing::info!("profiles and node labels synced");

    let reports: Api<NodeTuningReport> = Api::all(client.clone());
    let mut tuner = tuner::Tuner::default();
    let mut last_written: Option<NodeTuningReportStatus> = None;
    let mut last_write_at: Option<Instant> = None;
    let mut failures: u32 = 0;
    let mut report_object_ok = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Metrics {
            addr: bound,
            source,
        })?;

    loop {
        let Some(node) = nodes.state().into_iter().next() else {
            tracing::warn!(node = %args.node_name, "own Node object not found; waiting");
            if wait(&args, &changed, &mut sigterm, Duration::ZERO).await {
                return Ok(());
            }
            continue;
        };
        let labels: BTreeMap<String, String> = node.labels().clone();
        let cached = profiles.state();
        let mut unreadable = Vec::new();
        let all_refs: Vec<&NodeTuningProfile> = cached
            .iter()
            .filter_map(|g| match &g.0 {
                Ok(p) => Some(p),
                Err(e) => {
                    unreadable.push(format!(
                        "profile {} skipped: it does not match this agent's API types: {}",
                        e.metadata.name.as_deref().unwrap_or_default(),
                        e.error
                    ));
                    None
                }
            })
            .collect();
        let (matched, selector_errors) = crate::plan::matching(all_refs.iter().copied(), &labels);
        let merged = crate::plan::merge(matched.iter().copied());
        let pass = tuner.pass(&fs, &mut ledger, &merged, &all_refs);
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        metrics
            .drift_corrections
            .fetch_add(pass.drifted, Ordering::Relaxed);
        metrics.set_key_states(pass.results.iter().map(|r| r.state));

        let snapshot = match tcpstat::snapshot() {
            Ok(s) => {
                metrics.set_tcp(s.ipv4, s.ipv6);
                Some(s)
            }
            Err(e) => {
                metrics.tcp_count_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "counting TCP sockets failed");
                None
            }
        };
        let mut warnings = sticky_warnings.clone();
        warnings.extend(unreadable);
        warnings.extend(
            selector_errors
                .iter()
                .map(|(p, e)| format!("profile {p}: {e}")),
        );
        warnings.extend(
            crate::sysctl::checks::check(
                merged.desired.iter().map(|(k, d)| (k, &d.value)),
                snapshot.as_ref().map(|s| s.sockstat.tcp_tw),
            )
            .into_iter()
            .map(|w| format!("{}: {}", w.key, w.message)),
        );
        warnings.extend(pass.warnings.iter().cloned());
        let mut status = report::build_status(&PassFacts {
            kernel_release: &kernel_release,
            matched: &matched,
            merged: &merged,
            results: &pass.results,
            restored: &pass.restored,
            held_originals: ledger.entries().map(|e| e.key.dotted()).collect(),
            drift_corrections: tuner.drift_corrections,
            warnings,
            tcp: snapshot.as_ref(),
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        });
        report::carry_transition_times(last_written.as_ref(), &mut status);

        let due = last_write_at.is_none_or(|t| t.elapsed() >= args.heartbeat);
        let write = match report::change(last_written.as_ref(), &status) {
            Change::State => true,
            Change::Telemetry | Change::None => due,
        };
        let mut retry_in = Duration::ZERO;
        if write {
            // Bounded: a hung API server must not hold up the next pass, which keeps the node
            // tuned whatever the API does.
            let result = tokio::time::timeout(WRITE_TIMEOUT, async {
                if !report_object_ok {
                    apply_report_object(&reports, &args.node_name, &node).await?;
                    report_object_ok = true;
                }
                write_status(&reports, &args.node_name, &status).await
            })
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    format!("no answer within {WRITE_TIMEOUT:?}").into(),
                ))
            });
            match result {
                Ok(()) => {
                    metrics.report_writes.fetch_add(1, Ordering::Relaxed);
                    metrics.ready.store(true, Ordering::Relaxed);
                    last_written = Some(status);
                    last_write_at = Some(Instant::now());
                    failures = 0;
                }
                Err(e) => {
                    metrics.report_write_errors.fetch_add(1, Ordering::Relaxed);
                    // A report deleted by hand or by GC must be recreated before its status.
                    report_object_ok = false;
                    failures = failures.saturating_add(1);
                    retry_in = Duration::from_secs(1u64 << failures.min(5)).min(MAX_RETRY);
                    tracing::warn!(error = %e, retry_in = ?retry_in, "writing the NodeTuningReport failed");
                }
            }
        } else {
            metrics
                .report_writes_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        if wait(&args, &changed, &mut sigterm, retry_in).await {
            tracing::info!("SIGTERM: exiting; tuned values stay as they are");
            return Ok(());
        }
    }
}

/// Sleep until a watch event, the next interval (with jitter), or a retry; true on SIGTERM.
async fn wait(
    args: &AgentArgs,
    changed: &Notify,
    sigterm: &mut tokio::signal::unix::Signal,
    retry_in: Duration,
) -> bool {
    let mut next = jitter(args.interval);
    if !retry_in.is_zero() {
        next = next.min(retry_in);
    }
    tokio::select! {
        _ = sigterm.recv() => return true,
        _ = tokio::signal::ctrl_c() => return true,
        _ = tokio::time::sleep(next) => {}
        _ = changed.notified() => tokio::time::sleep(DEBOUNCE).await,
    }
    false
}

/// ±10 % so thousands of agents started together do not write in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or_default();
    let spread = (nanos % 2001) as f64 / 10_000.0 - 0.1; // -0.1..=0.1
    d.mul_f64(1.0 + spread)
}

fn watch_error(metrics: &Arc<AgentMetrics>) -> impl Fn() + Send + Sync + 'static {
    let m = metrics.clone();
    move || {
        m.watch_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Create or update the report object itself, owned by the Node so it goes away with it.
async fn apply_report_object(
    reports: &Api<NodeTuningReport>,
    node_name: &str,
    node: &PartialObjectMeta<Node>,
) -> Result<(), kube::Error> {
    let mut report = NodeTuningReport::new(
        node_name,
        NodeTuningReportSpec {
            node_name: node_name.to_string(),
        },
    );
    report.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node_name.to_string(),
        uid: node.uid().unwrap_or_default(),
        ..Default::default()
    }]);
    reports
        .patch(
            node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&report),
        )
        .await?;
    Ok(())
}

async fn write_status(
    reports: &Api<NodeTuningReport>,
    node_name: &str,
    status: &NodeTuningReportStatus,
) -> Result<(), kube::Error> {
    let body = serde_json::json!({
        "apiVersion": "nodetune.dev/v1alpha1",
        "kind": "NodeTuningReport",
        "metadata": {"name": node_name},
        "status": status,
    });
    reports
        .patch_status(
            node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}
