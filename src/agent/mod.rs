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
pub mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PartialObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

pub use config::AgentArgs;
use metrics::AgentMetrics;
use report::PassFacts;
pub use writer::FIELD_MANAGER;
use writer::ReportWriter;

use crate::api::{NodeTuningProfile, NodeTuningReportStatus};
use crate::http::{self, Response, Router};
use crate::sysctl::{Ledger, LedgerError, SysctlFs};
use crate::tcpstat;
use crate::watch::reflect;

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
    #[error("cannot handle SIGTERM: {0}")]
    Signal(#[source] std::io::Error),
}

/// After a watch event, wait this long for more before acting, so a burst is one pass.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// The node side of the agent: its kernel, its ledger, and what passes remember.
struct NodeSide {
    fs: SysctlFs,
    ledger: Ledger,
    tuner: tuner::Tuner,
    kernel_release: String,
    /// Warnings that hold for the life of the process (a ledger set aside at start).
    sticky_warnings: Vec<String>,
    metrics: Arc<AgentMetrics>,
}

impl NodeSide {
    fn open(args: &AgentArgs, metrics: Arc<AgentMetrics>) -> Result<Self, AgentError> {
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
        let kernel_release = std::fs::read_to_string(args.proc_sys.join("kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Self {
            fs: SysctlFs::new(&args.proc_sys),
            ledger: loaded.ledger,
            tuner: tuner::Tuner::with_policy_file(args.policy_file.clone()),
            kernel_release,
            sticky_warnings,
            metrics,
        })
    }

    /// One pass: tune the kernel for the profiles matching `labels`, count TCP sockets, and
    /// return the report status describing it all. Needs no API server.
    fn pass(
        &mut self,
        labels: &BTreeMap<String, String>,
        cached: &[Arc<DeserializeGuard<NodeTuningProfile>>],
    ) -> NodeTuningReportStatus {
        let mut warnings = self.sticky_warnings.clone();
        let all: Vec<&NodeTuningProfile> = cached
            .iter()
            .filter_map(|g| match &g.0 {
                Ok(p) => Some(p),
                Err(e) => {
                    warnings.push(format!(
                        "profile {} skipped: it does not match this agent's API types: {}",
                        e.metadata.name.as_deref().unwrap_or_default(),
                        e.error
                    ));
                    None
                }
            })
            .collect();
        let (matched, selector_errors) = crate::plan::matching(all.iter().copied(), labels);
        let merged = crate::plan::merge(matched.iter().copied());
        let pass = self.tuner.pass(&self.fs, &mut self.ledger, &merged, &all);
        let m = &self.metrics;
        m.passes.fetch_add(1, Ordering::Relaxed);
        m.drift_corrections
            .fetch_add(pass.drifted, Ordering::Relaxed);
        m.set_key_states(pass.results.iter().map(|r| r.state));

        let snapshot = match tcpstat::snapshot() {
            Ok(s) => {
                m.set_tcp(s.ipv4, s.ipv6);
                Some(s)
            }
            Err(e) => {
                m.tcp_count_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "counting TCP sockets failed");
                None
            }
        };
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
        report::build_status(&PassFacts {
            kernel_release: &self.kernel_release,
            matched: &matched,
            merged: &merged,
            results: &pass.results,
            restored: &pass.restored,
            held_originals: self.ledger.entries().map(|e| e.key.dotted()).collect(),
            drift_corrections: self.tuner.drift_corrections,
            warnings,
            tcp: snapshot.as_ref(),
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        })
    }
}

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let metrics = Arc::new(AgentMetrics::default());
    let mut node_side = NodeSide::open(&args, metrics.clone())?;
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

    let client = crate::watch::client().await.map_err(AgentError::Client)?;
    let changed = Arc::new(Notify::new());
    // A profile that does not deserialize is skipped with a warning instead of stalling the
    // watch (and with it every other profile).
    let profiles = reflect(
        watcher(
            Api::<DeserializeGuard<NodeTuningProfile>>::all(client.clone()),
            crate::watch::config(),
        )
        .default_backoff(),
        changed.clone(),
        "profiles",
        watch_error(&metrics),
    );
    let nodes = reflect(
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            crate::watch::config().fields(&format!("metadata.name={}", args.node_name)),
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

    let mut writer = ReportWriter::new(Api::all(client.clone()), &args.node_name, args.heartbeat);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;

    // Set on SIGTERM: one last pass, then exit. The pass acts on the same synced view as any
    // other, so an agent replaced while its profiles still apply restores nothing, while one
    // withdrawn before its first report still puts back what no profile wants.
    let mut stopping = false;
    loop {
        let Some(node) = nodes.state().into_iter().next() else {
            tracing::warn!(node = %args.node_name, "own Node object not found; waiting");
            if wait(&args, &changed, &mut sigterm, Duration::ZERO).await {
                return Ok(());
            }
            continue;
        };
        let mut status = node_side.pass(node.labels(), &profiles.state());
        report::carry_transition_times(writer.last(), &mut status);
        let mut retry_in = Duration::ZERO;
        match writer.offer(status, &node).await {
            writer::Outcome::Written => {
                metrics.report_writes.fetch_add(1, Ordering::Relaxed);
                metrics.ready.store(true, Ordering::Relaxed);
            }
            writer::Outcome::Skipped => {
                metrics
                    .report_writes_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
            writer::Outcome::Failed { retry_in: r, error } => {
                metrics.report_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %error, retry_in = ?r, "writing the NodeTuningReport failed");
                retry_in = r;
            }
        }
        if stopping {
            tracing::info!("exiting after the last pass; wanted values stay as they are");
            return Ok(());
        }
        if wait(&args, &changed, &mut sigterm, retry_in).await {
            tracing::info!("SIGTERM: one last pass, then exit");
            stopping = true;
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
