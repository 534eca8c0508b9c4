//! `nodetune agent`: the node loop. Watches its Node and every NodeTuningProfile, applies the
//! merged sysctls (see [`tuner`]), counts TCP sockets and writes the node's NodeTuningReport.
//!
//! The kernel side never waits for the API: once the first full view of profiles and labels is
//! in, each pass works from the local caches, so the node stays tuned through API outages and
//! reports catch up when the API is back.
pub mod config;
pub mod contest;
pub mod error;
pub mod host;
pub mod ledger_guard;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod pod_tune;
pub mod pod_watch;
pub mod pods;
pub mod report;
pub mod revision;
pub mod taint;
pub mod tcp;
pub mod tuner;
pub mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PartialObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

pub use config::AgentArgs;
pub use error::AgentError;
use metrics::AgentMetrics;
use report::PassFacts;
pub use writer::FIELD_MANAGER;
use writer::ReportWriter;

use crate::api::{NodeTuningProfile, NodeTuningReportStatus};
use crate::http;
use crate::podnet;
use crate::sysctl::SysctlFs;
use crate::tcpstat;
use crate::watch::reflect;

/// After a watch event, wait this long for more before acting, so a burst is one pass.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// The same for pod events (a pod's creation is several: scheduled, sandbox, containers).
const POD_DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the wait between passes checks the policy file: a policy change reaches the
/// kernel within this (plus a pass) of the file changing in the pod, not at the next interval.
pub const POLICY_POLL: Duration = Duration::from_secs(2);

/// The node side of the agent: its kernel, its ledger, and what passes remember.
struct NodeSide {
    fs: SysctlFs,
    ledger: ledger_guard::LedgerGuard,
    tuner: tuner::Tuner,
    kernel_release: String,
    metrics: Arc<AgentMetrics>,
    tcp: tcp::TcpCounter,
    /// TIME_WAIT against its cap, held for a while after the kernel drops some.
    time_wait: tcp::TimeWaitWatch,
    /// The kernel's TCP damage counters, with rates over one heartbeat.
    counters: tcp::DamageCounters,
    /// The revision of each rolled-out profile the controller assigned to this node.
    revisions: BTreeMap<String, i64>,
    /// Pod namespaces' counts, when pod counting is on.
    pods: Option<podnet::PodCounter>,
    host: host::HostWatch,
    /// Tunes pods' namespaces, when pod targeting is on.
    pod_tuner: Option<pod_tune::PodTuner>,
    /// The cluster policy, read again for every pod pass (fail closed, as the tuner does).
    policy_file: Option<std::path::PathBuf>,
}

/// What a pass works from: the node's labels, the profiles and, when watched, the pods.
struct PassInput<'a> {
    labels: &'a BTreeMap<String, String>,
    cached: &'a [Arc<DeserializeGuard<NodeTuningProfile>>],
    pods: Option<&'a pod_watch::PodViews>,
}

/// The profiles that deserialized; a warning for each that did not.
fn usable_profiles<'a>(
    cached: &'a [Arc<DeserializeGuard<NodeTuningProfile>>],
    warnings: &mut Vec<String>,
) -> Vec<&'a NodeTuningProfile> {
    cached
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
        .collect()
}

impl NodeSide {
    fn open(args: &AgentArgs, metrics: Arc<AgentMetrics>) -> Result<Self, AgentError> {
        let kernel_release = std::fs::read_to_string(args.proc_sys.join("kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Self {
            fs: SysctlFs::new(&args.proc_sys),
            // A ledger that cannot be used stops writes, never the agent.
            ledger: ledger_guard::LedgerGuard::open(&args.state_dir),
            tuner: tuner::Tuner::with_policy_file(args.policy_file.clone())
                .persisting_to(args.host_root.clone())
                .contest_limits(args.contest_limits()),
            kernel_release,
            metrics,
            // The full walk once per heartbeat: that is when the counts are written.
            tcp: tcp::TcpCounter::new(tcpstat::SnapshotOptions::default(), args.heartbeat),
            time_wait: tcp::TimeWaitWatch::new(tcp::OVERFLOW_HOLD),
            counters: tcp::DamageCounters::new(
                tcpstat::SnapshotOptions::default().proc_root,
                args.heartbeat,
            ),
            revisions: BTreeMap::new(),
            pods: args.pod_counting.then(|| tcp::pod_counter(args)),
            host: host::HostWatch::new(
                args.proc_sys.join(crate::sysctl::boot::BOOT_ID_FILE),
                args.host_root.clone(),
            ),
            pod_tuner: args.pod_targeting.then(|| pod_tune::tuner(args)),
            policy_file: args.policy_file.clone(),
        })
    }

    /// Counts the pods' namespaces (bounded; see [`tcp::pod_counter`]) after the pass has
    /// tuned the host, so pods never delay the host's keys. `None` when counting is off or
    /// failed as a whole (then counted in `nodetune_agent_tcp_count_errors_total`).
    fn count_pods(&mut self, names: &pods::PodNames) -> Option<crate::api::PodsTcp> {
        let counter = self.pods.as_mut()?;
        match counter.count() {
            Ok(pass) => {
                let summary = pods::summarise(&pass, names);
                self.metrics.set_pods(&summary);
                Some(summary)
            }
            Err(e) => {
                self.metrics.tcp_count_errors.inc();
                tracing::warn!(error = %e, "counting pods' TCP sockets failed");
                None
            }
        }
    }

    /// Applies the host's merge and restores what no profile wants; with an unusable ledger,
    /// fails closed: every key is evaluated and refused with the reason, nothing is written.
    fn tune_host(
        &mut self,
        merged: &crate::plan::Merged,
        all: &[&NodeTuningProfile],
    ) -> (tuner::PassOutcome, Option<String>) {
        let mut ledger_problem = self.ledger.problem();
        if let (ledger_guard::Guarded::Usable(ledger), None) =
            (&mut self.ledger.ledger, &ledger_problem)
        {
            match self.host.before_pass(&self.fs, ledger) {
                Ok(true) => self.tuner.forget_verified(),
                Ok(false) => {}
                Err(why) => ledger_problem = Some(why),
            }
        }
        let pass = match (&mut self.ledger.ledger, &ledger_problem) {
            (ledger_guard::Guarded::Usable(ledger), None) => {
                self.tuner.pass(&self.fs, ledger, merged, all)
            }
            (_, why) => {
                let why = why.clone().unwrap_or_default();
                tuner::PassOutcome {
                    results: crate::plan::execute(
                        &self.fs,
                        None,
                        &crate::sysctl::Policy::refuse_all(why.clone()),
                        merged,
                    ),
                    restored: Vec::new(),
                    warnings: vec![why],
                    drifted: 0,
                    restores: 0,
                    held: 0,
                    newly_contested: 0,
                }
            }
        };
        self.metrics.record_pass(&pass);
        (pass, ledger_problem)
    }

    /// Tunes the selected pods' namespaces (see [`pod_tune`]); `None` when pod targeting is
    /// off or the pods are not watched.
    fn tune_pods(
        &mut self,
        labels: &BTreeMap<String, String>,
        all: &[&NodeTuningProfile],
        views: Option<&pod_watch::PodViews>,
    ) -> Option<pod_tune::PodTuneOutcome> {
        let tuner = self.pod_tuner.as_mut()?;
        let (infos, known) = views?.infos()?;
        let mut warnings = Vec::new();
        let policy = pod_tune::policy(self.policy_file.as_deref(), &mut warnings);
        let plan = crate::podtune::plan_pods(labels, all.iter().copied(), &infos, &policy);
        warnings.extend(
            plan.selector_errors
                .iter()
                .map(|(p, e)| format!("profile {p}: {e}")),
        );
        let problem = self.ledger.problem();
        let mut out = match (&mut self.ledger.ledger, problem) {
            (ledger_guard::Guarded::Usable(ledger), None) => {
                pod_tune::pass_if_needed(tuner, ledger, &plan, &known, all, &policy)
            }
            (_, why) => pod_tune::refused(&plan, why.unwrap_or_default()),
        };
        out.warnings.splice(0..0, warnings);
        Some(out)
    }

    /// Counts the host's TCP sockets (the tier due) and assesses TIME_WAIT against its cap.
    fn count_host(&mut self) -> (Option<tcpstat::TcpSnapshot>, Option<tcp::TimeWaitStatus>) {
        let m = &self.metrics;
        let snapshot = match self.tcp.count() {
            Ok((s, tier)) => {
                if tier == tcp::Tier::Walk {
                    m.set_tcp(s.ipv4, s.ipv6);
                }
                m.set_sockstat(&s.sockstat);
                Some(s)
            }
            Err(e) => {
                m.tcp_count_errors.inc();
                tracing::warn!(error = %e, "counting TCP sockets failed");
                None
            }
        };
        let time_wait = snapshot.as_ref().map(|s| {
            let tw = self.time_wait.assess(
                s.sockstat.tcp_tw,
                s.sockstat.tcp_max_tw_buckets,
                tcp::read_overflows(self.tcp.proc_root()),
                std::time::Instant::now(),
            );
            m.tcp_time_wait_overflows.inc_by(tw.new_overflows);
            tw
        });
        (snapshot, time_wait)
    }

    /// [`Self::pass_with`] without pods: the host alone.
    #[cfg(test)]
    fn pass(
        &mut self,
        labels: &BTreeMap<String, String>,
        cached: &[Arc<DeserializeGuard<NodeTuningProfile>>],
    ) -> NodeTuningReportStatus {
        self.pass_with(&PassInput {
            labels,
            cached,
            pods: None,
        })
    }

    /// One pass: tune the kernel for the profiles matching the node's labels (the host first,
    /// then the selected pods' namespaces, bounded), count TCP sockets, and return the report
    /// status describing it all. Needs no API server.
    fn pass_with(&mut self, input: &PassInput<'_>) -> NodeTuningReportStatus {
        self.with_profiles(input.cached, |node, all, warnings| {
            node.host_and_pods(input, all, warnings)
        })
    }

    /// Runs `step` with the profiles in force on this node: those that deserialized (with a
    /// warning for each that did not), each at the revision the controller assigned to this
    /// node (see `revision`). The one way both kinds of pass see the profiles.
    fn with_profiles<R>(
        &mut self,
        cached: &[Arc<DeserializeGuard<NodeTuningProfile>>],
        step: impl FnOnce(&mut Self, &[&NodeTuningProfile], Vec<String>) -> R,
    ) -> R {
        let mut warnings = Vec::new();
        let usable = usable_profiles(cached, &mut warnings);
        let revised = revision::select(&usable, &self.revisions);
        let all: Vec<&NodeTuningProfile> = revised.iter().map(AsRef::as_ref).collect();
        step(self, &all, warnings)
    }

    /// [`Self::pass_with`] once the profiles in force are known.
    fn host_and_pods(
        &mut self,
        input: &PassInput<'_>,
        all: &[&NodeTuningProfile],
        mut warnings: Vec<String>,
    ) -> NodeTuningReportStatus {
        let (matched, selector_errors) = crate::plan::matching(all.iter().copied(), input.labels);
        let merged = crate::plan::merge(matched.iter().copied());
        let (pass, ledger_problem) = self.tune_host(&merged, all);
        let pod_outcome = self.tune_pods(input.labels, all, input.pods);
        let (snapshot, time_wait) = self.count_host();
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
            kernel_release: &self.kernel_release,
            matched: &matched,
            merged: &merged,
            results: &pass.results,
            restored: &pass.restored,
            held_originals: match &self.ledger.ledger {
                ledger_guard::Guarded::Usable(l) => l.entries().map(|e| e.key.dotted()).collect(),
                ledger_guard::Guarded::Unloadable(_) => Vec::new(),
            },
            ledger_problem: ledger_problem.as_deref(),
            time_wait: time_wait.as_ref(),
            drift_corrections: self.tuner.drift_corrections,
            warnings,
            tcp: snapshot.as_ref(),
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        });
        self.tuner.annotate(&mut status);
        self.host.annotate(&mut status, &self.fs, &merged);
        status.tcp_counters = self.counters.sample(&self.metrics);
        revision::annotate(&mut status, all, &self.revisions);
        // Without a view of the pods (tests of the host alone) the host entries stay as built.
        if input.pods.is_some() || self.pod_tuner.is_none() {
            pod_tune::fill_status(&mut status, pod_outcome.as_ref(), self.pod_tuner.is_some());
        }
        status
    }

    /// A pass of the pods only, on a pod event: `last` (the status last written) with fresh
    /// `podSysctls`. The host's keys wait for their own events and interval.
    fn pod_pass(
        &mut self,
        input: &PassInput<'_>,
        last: &NodeTuningReportStatus,
    ) -> NodeTuningReportStatus {
        // The warnings about unusable profiles are in `last` already, from its host pass.
        let outcome = self.with_profiles(input.cached, |node, all, _warnings| {
            node.tune_pods(input.labels, all, input.pods)
        });
        let mut status = last.clone();
        status.pod_sysctls = Vec::new();
        pod_tune::fill_status(&mut status, outcome.as_ref(), self.pod_tuner.is_some());
        status
    }
}

/// Run the agent until SIGTERM. An error that stops it is logged with its kind first.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let result = serve(args).await;
    if let Err(e) = &result {
        tracing::error!(kind = e.metric_label(), error = %e, "the agent stops");
    }
    result
}

/// The agent's watches, each feeding a local cache.
struct Watches {
    profiles: kube::runtime::reflector::Store<DeserializeGuard<NodeTuningProfile>>,
    nodes: kube::runtime::reflector::Store<PartialObjectMeta<Node>>,
    pods: Option<pod_watch::PodViews>,
    /// Profiles and the node's labels changed: a full pass.
    changed: Arc<Notify>,
    /// A pod of this node or a namespace changed (pod targeting only): a pod pass.
    pods_changed: Arc<Notify>,
}

impl Watches {
    fn start(args: &AgentArgs, client: &kube::Client, metrics: &Arc<AgentMetrics>) -> Self {
        let changed = Arc::new(Notify::new());
        let pods_changed = Arc::new(Notify::new());
        // A profile that does not deserialize is skipped with a warning instead of stalling
        // the watch (and with it every other profile).
        let profiles = reflect(
            watcher(
                Api::<DeserializeGuard<NodeTuningProfile>>::all(client.clone()),
                crate::watch::config(),
            )
            .default_backoff(),
            changed.clone(),
            "profiles",
            watch_error(metrics),
        );
        let nodes = reflect(
            watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                crate::watch::config().fields(&format!("metadata.name={}", args.node_name)),
            )
            .default_backoff(),
            changed.clone(),
            "node",
            watch_error(metrics),
        );
        let pods = (args.pod_counting || args.pod_targeting).then(|| {
            pod_watch::PodViews::start(
                client,
                &args.node_name,
                args.pod_targeting,
                pods_changed.clone(),
                watch_error(metrics),
            )
        });
        Self {
            profiles,
            nodes,
            pods,
            changed,
            pods_changed,
        }
    }

    /// Acting before every view is complete could restore keys a profile still wants.
    async fn ready(&self) -> Result<(), AgentError> {
        let (Ok(()), Ok(())) = (
            self.profiles.wait_until_ready().await,
            self.nodes.wait_until_ready().await,
        ) else {
            return Err(AgentError::WatchEnded("initial"));
        };
        // The pods are not waited for: the host's tuning must not depend on them (pod tuning
        // starts once their lists are complete, see `pod_watch`).
        tracing::info!("profiles and node labels synced");
        Ok(())
    }
}

/// Starts `/metrics` and the probes; they stop when the returned sender is dropped.
async fn start_metrics(
    args: &AgentArgs,
    client: &kube::Client,
    metrics: &Arc<AgentMetrics>,
) -> Result<tokio::sync::oneshot::Sender<()>, AgentError> {
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server_stops = async move {
        let _ = server_stopped.await;
    };
    let bind = args.metrics_bind();
    let (bound, _server) = http::serve_with(
        bind,
        metrics.clone(),
        metrics_options(args, client),
        server_stops,
    )
    .await
    .map_err(|source| AgentError::Metrics { addr: bind, source })?;
    tracing::info!(node = %args.node_name, metrics = %bound, auth = args.metrics_auth, "agent starting");
    Ok(stop_server)
}

/// Offers `status` to the writer; the delay before a retry when the write failed.
async fn write_report(
    writer: &mut ReportWriter,
    status: NodeTuningReportStatus,
    node: &PartialObjectMeta<Node>,
    metrics: &AgentMetrics,
) -> Duration {
    match writer.offer(status, node).await {
        writer::Outcome::Written => {
            metrics.report_writes.inc();
            metrics.set_ready();
        }
        writer::Outcome::Skipped => {
            metrics.report_writes_skipped.inc();
        }
        writer::Outcome::Failed { retry_in, error } => {
            metrics.report_write_errors.inc();
            tracing::warn!(error = %error, retry_in = ?retry_in, "writing the NodeTuningReport failed");
            return retry_in;
        }
    }
    Duration::ZERO
}

async fn serve(args: AgentArgs) -> Result<(), AgentError> {
    let metrics = Arc::new(AgentMetrics::default());
    let mut node_side = NodeSide::open(&args, metrics.clone())?;
    let client = crate::watch::client().await.map_err(AgentError::Client)?;
    // Dropped when `serve` returns, after the last pass: the server then stops.
    let _stop_server = start_metrics(&args, &client, &metrics).await?;
    let w = Watches::start(&args, &client, &metrics);
    w.ready().await?;
    let mut writer = ReportWriter::new(Api::all(client.clone()), &args.node_name, args.heartbeat);
    let mut startup_taint = TaintStep {
        nodes: Api::all(client.clone()),
        node_name: args.node_name.clone(),
        taint: taint::StartupTaint::default(),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;

    // Set on SIGTERM: one last pass, then exit. The pass acts on the same synced view as any
    // other, so an agent replaced while its profiles still apply restores nothing, while one
    // withdrawn before its first report still puts back what no profile wants.
    let mut stopping = false;
    let mut wake = Wake::Pass;
    loop {
        let Some(node) = w.nodes.state().into_iter().next() else {
            tracing::warn!(node = %args.node_name, "own Node object not found; waiting");
            if wait(&args, &w, &mut sigterm, Duration::ZERO, &node_side.tuner).await == Wake::Stop {
                return Ok(());
            }
            continue;
        };
        node_side.revisions = revision::assignments(&node);
        let cached = w.profiles.state();
        let input = PassInput {
            labels: node.labels(),
            cached: &cached,
            pods: w.pods.as_ref(),
        };
        let mut status = pass_step(
            &mut node_side,
            wake,
            &input,
            writer.last(),
            &mut startup_taint,
        )
        .await;
        if stopping && report::mark_withdrawn(&mut status) {
            tracing::info!("no profile selects this node: leaving the report marked withdrawn");
        }
        report::carry_transition_times(writer.last(), &mut status);
        let retry_in = write_report(&mut writer, status, &node, &metrics).await;
        // What the pass allocated is freed by now: the agent waits with the pages given back.
        memory::trim();
        if stopping {
            tracing::info!("exiting after the last pass; wanted values stay as they are");
            return Ok(());
        }
        wake = wait(&args, &w, &mut sigterm, retry_in, &node_side.tuner).await;
        if wake == Wake::Stop {
            tracing::info!("SIGTERM: one last pass, then exit");
            stopping = true;
        }
    }
}

/// The startup taint and where to remove it from.
struct TaintStep {
    nodes: Api<Node>,
    node_name: String,
    taint: taint::StartupTaint,
}

/// The pass `wake` calls for: pods only on a pod event once a report was written (the host's
/// keys wait for their own events), else a full pass; then the pods' counts. Only a full pass
/// takes the startup-taint step: the taint waits for the host's keys, which a pod pass neither
/// applies nor verifies (its status carries the last full pass's host entries).
async fn pass_step(
    node_side: &mut NodeSide,
    wake: Wake,
    input: &PassInput<'_>,
    last: Option<&NodeTuningReportStatus>,
    taint: &mut TaintStep,
) -> NodeTuningReportStatus {
    let (mut status, host_pass) = match (wake, last) {
        (Wake::Pods, Some(last)) => (node_side.pod_pass(input, last), false),
        _ => (node_side.pass_with(input), true),
    };
    if let Some(views) = input.pods {
        status.pods = node_side.count_pods(&views.names());
    }
    if host_pass {
        let TaintStep {
            nodes,
            node_name,
            taint,
        } = taint;
        taint.after_pass(nodes, node_name, &mut status).await;
    }
    status
}

/// Why the agent woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// The interval, a profile or the node changed, the policy file changed, a retry.
    Pass,
    /// A pod of this node (or a namespace) changed: tune the pods now.
    Pods,
    /// SIGTERM: one last pass, then exit.
    Stop,
}

/// Sleep until a watch event, a change of the policy file, the next interval (with jitter),
/// or a retry.
async fn wait(
    args: &AgentArgs,
    w: &Watches,
    sigterm: &mut tokio::signal::unix::Signal,
    retry_in: Duration,
    tuner: &tuner::Tuner,
) -> Wake {
    let mut next = jitter(args.interval);
    if !retry_in.is_zero() {
        next = next.min(retry_in);
    }
    tokio::select! {
        _ = sigterm.recv() => return Wake::Stop,
        _ = tokio::signal::ctrl_c() => return Wake::Stop,
        _ = tokio::time::sleep(next) => {}
        _ = w.changed.notified() => tokio::time::sleep(DEBOUNCE).await,
        _ = policy_changed(tuner) => tracing::info!("the policy file changed; a pass now"),
        // A short debounce: a new pod must hold its values within 2 s of its sandbox.
        _ = w.pods_changed.notified() => {
            tokio::time::sleep(POD_DEBOUNCE).await;
            return Wake::Pods;
        }
    }
    Wake::Pass
}

/// Resolves once the policy file differs from what the last pass read.
async fn policy_changed(tuner: &tuner::Tuner) {
    let mut tick = tokio::time::interval(POLICY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tuner.policy_changed() {
            return;
        }
    }
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

/// The metrics port's limits, and its authentication when --metrics-auth asks for it.
fn metrics_options(args: &AgentArgs, client: &kube::Client) -> http::Options {
    http::Options {
        limits: http::Limits {
            max_connections: args.metrics_max_connections,
            ..http::Limits::default()
        },
        auth: args.metrics_auth.then(|| {
            Arc::new(http::auth::KubeAuthorizer::new(client.clone())) as Arc<dyn http::Authorize>
        }),
        ..http::Options::default()
    }
}

fn watch_error(metrics: &Arc<AgentMetrics>) -> impl Fn() + Clone + Send + Sync + 'static {
    let m = metrics.clone();
    move || {
        m.watch_errors.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's pass on a fake /proc/sys: a restore shows in `nodetune_agent_restores_total`
    /// once, although reports keep listing it.
    /// A fake /proc/sys holding tcp_fin_timeout = 60, an empty state dir, and agent args
    /// pointing at both.
    fn fake_node() -> (
        tempfile::TempDir,
        tempfile::TempDir,
        std::path::PathBuf,
        AgentArgs,
    ) {
        let proc_sys = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fin = proc_sys.path().join("net/ipv4/tcp_fin_timeout");
        std::fs::create_dir_all(fin.parent().expect("parent")).expect("mkdir");
        std::fs::write(&fin, "60\n").expect("write");
        let args = AgentArgs::for_tests("node-a", state.path(), proc_sys.path());
        (proc_sys, state, fin, args)
    }

    /// A pod event's pass leaves the startup taint alone, even when the host entries it carries
    /// would let it go; the next full pass takes the taint step (asks for the Node).
    #[tokio::test]
    async fn a_pod_only_pass_does_not_touch_the_startup_taint() {
        let (_proc_sys, _state, _fin, args) = fake_node();
        let mut node = NodeSide::open(&args, Arc::new(AgentMetrics::default())).expect("open");
        let (client, mut api) = crate::mock_api::client();
        let mut taint = TaintStep {
            nodes: Api::all(client),
            node_name: "node-a".into(),
            taint: taint::StartupTaint::default(),
        };
        let labels = BTreeMap::new();
        let input = PassInput {
            labels: &labels,
            cached: &[],
            pods: None,
        };
        // The last full pass applied its key but could not reach the API to remove the taint.
        let last = NodeTuningReportStatus {
            sysctls: vec![crate::api::SysctlEntry {
                key: "net.ipv4.tcp_fin_timeout".into(),
                desired: Some("30".into()),
                actual: Some("30".into()),
                original: None,
                profile: None,
                scope: crate::api::Scope::NetworkNamespace,
                optional: false,
                state: crate::api::KeyState::Applied,
                message: None,
            }],
            ..Default::default()
        };
        assert!(taint::verdict(&last).is_some(), "the taint could go");

        let pod_pass = pass_step(&mut node, Wake::Pods, &input, Some(&last), &mut taint);
        let (status, ()) = tokio::join!(pod_pass, api.expect_silence());
        assert_eq!(
            (status.startup_taint, status.warnings),
            (last.startup_taint.clone(), last.warnings.clone())
        );

        let host_pass = pass_step(&mut node, Wake::Pass, &input, Some(&last), &mut taint);
        let node_json = serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}
        });
        let (_, seen) = tokio::join!(
            host_pass,
            api.expect("GET", "/api/v1/nodes/node-a", 200, node_json)
        );
        assert_eq!(seen.method, "GET");
    }

    #[test]
    fn a_restore_is_counted_once_in_the_metrics() {
        let (_proc_sys, _state, fin, args) = fake_node();
        let metrics = Arc::new(AgentMetrics::default());
        let mut node = NodeSide::open(&args, metrics.clone()).expect("open");
        let profile = NodeTuningProfile::test("web")
            .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
            .restoring()
            .cached();
        let labels = BTreeMap::new();

        node.pass(&labels, std::slice::from_ref(&profile));
        assert_eq!(std::fs::read_to_string(&fin).expect("read"), "30\n");
        assert_eq!(metrics.restores.get(), 0);

        // The profile is gone: the original comes back, counted once over two passes.
        let status = node.pass(&labels, &[]);
        assert_eq!(std::fs::read_to_string(&fin).expect("read").trim(), "60");
        node.pass(&labels, &[]);
        assert_eq!(metrics.restores.get(), 1, "{status:?}");
        assert!(
            metrics
                .render()
                .contains("\nnodetune_agent_restores_total 1\n"),
            "{}",
            metrics.render()
        );
        assert_eq!(metrics.passes.get(), 3);
    }

    #[test]
    fn a_corrupt_ledger_stops_writes_not_the_agent_and_the_report_says_why() {
        let (_proc_sys, state, fin, args) = fake_node();
        std::fs::write(state.path().join("ledger.json"), "{\"version\": 1, \"entr").expect("write");
        let metrics = Arc::new(AgentMetrics::default());
        let mut node = NodeSide::open(&args, metrics.clone()).expect("no exit, no crash loop");
        let profile = NodeTuningProfile::test("web")
            .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
            .cached();
        let labels = BTreeMap::new();

        let status = node.pass(&labels, std::slice::from_ref(&profile));
        assert_eq!(
            std::fs::read_to_string(&fin).expect("read"),
            "60\n",
            "nothing written"
        );
        let stalled = crate::conditions::find(&status.conditions, crate::conditions::Type::Stalled)
            .expect("Stalled");
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "LedgerUnusable")
        );
        assert!(
            stalled.message.contains("ledger.json.corrupt-"),
            "{}",
            stalled.message
        );
        let entry = status.sysctls.first().expect("the key is reported");
        assert!(entry.is_failure(), "{entry:?}");

        // A person checked the set-aside copy and renamed it: the next pass tunes.
        let copy = std::fs::read_dir(state.path())
            .expect("ls")
            .filter_map(Result::ok)
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("ledger.json.corrupt-")
            })
            .expect("set-aside copy");
        std::fs::rename(copy.path(), state.path().join("checked")).expect("rename");
        let status = node.pass(&labels, std::slice::from_ref(&profile));
        assert_eq!(std::fs::read_to_string(&fin).expect("read"), "30\n");
        assert!(crate::conditions::is_true(
            &status.conditions,
            crate::conditions::Type::Ready
        ));
    }
}
