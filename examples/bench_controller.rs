//! Benchmark: the real `nodetune controller` against the project's real control plane
//! (`tests/cluster/up`) holding M Node objects and M NodeTuningReports.
//!
//! ```sh
//! cargo build --release --bin nodetune && cargo build --example bench_controller
//! target/debug/examples/bench_controller M [STEADY_SECS] [PROFILES]   # as root
//! ```
//!
//! or `scripts/bench-controller` for M = 1,000 / 5,000 / 20,000. What it does:
//!
//! 1. starts a control plane, applies the CRDs and the controller's namespace, ServiceAccount
//!    and RBAC from `deploy/nodetune.yaml` (everything but the controller Deployment);
//! 2. creates M Nodes (metadata only, as a cloud node carries it: a `pool` label among 8 and a
//!    `zone` label among 3 for the selection, 8 well-known labels, 7 annotations),
//!    PROFILES profiles (default 10) each selecting 3 of the 8 pools (so they overlap: a node
//!    is selected by ~4 profiles), each with 4 keys of its own and one key all profiles set
//!    (so every node has overridden keys), and M reports as the agents write them (every
//!    selecting profile applied, 10–30 sysctl entries, TCP counts, sockstat);
//! 3. starts `nodetune controller` as a plain process, impersonating the controller's
//!    ServiceAccount (so the RBAC is the shipped one), and times until every profile's status
//!    is complete;
//! 4. for STEADY_SECS (default 120) plays the agents: each report gets a telemetry write (new
//!    TCP counts and lastReportTime) once per heartbeat (120 s, the agent default), spread
//!    evenly; every 20 s a profile (not the probe's) is edited and the agents of its nodes pick
//!    the new generation up within an agent interval (30 s); and every 2 s a probe flips one
//!    key of one node of the first profile between Applied and Failed, timing from the write's
//!    acknowledgement to the profile status showing the new `failedNodes` (watched); a probe
//!    always asks for the opposite of what the status shows, so only a real change answers it;
//!    The agent pods the controller's DaemonSet causes are kept out: a ResourceQuota of 0 pods
//!    in the agent namespace makes kube-controller-manager's DaemonSet controller back off
//!    (exponentially) after its first refused creates, instead of creating a pod per fake node
//!    in rate-limited batches through the measured window (there is no kubelet to run them).
//!    `NODETUNE_BENCH_AGENT_PODS=1` lets the pods be created, as earlier runs did;
//! 5. prints the latency (median, p99, max) end to end and the controller's own (its
//!    `report_to_status_patch` histogram over the steady phase, and the status patches' round
//!    trip), the controller's peak RSS and CPU, the API
//!    server's requests by verb and resource (`apiserver_request_total`; the harness runs
//!    without API Priority and Fairness, so there is no per-user count: the controller's share
//!    is the total minus the load generator's own requests, an upper bound since
//!    kube-controller-manager and the scheduler are in it too), and the largest profile status.
//!
//! Compare ratios across M measured the same day; the machine is shared.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, ResourceQuota, ResourceQuotaSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, Time,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;

use nodetune::api::{
    AppliedProfile, KeyState, Mode, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport,
    NodeTuningReportSpec, NodeTuningReportStatus, ReportSummary, Scope, SockstatSummary,
    SysctlEntry, TcpCounts,
};

const POOLS: usize = 8;
const ZONES: usize = 3;
const KEYS_PER_PROFILE: usize = 4;
const SHARED_KEY: &str = "net.core.somaxconn";
const HEARTBEAT: Duration = Duration::from_secs(120);
const AGENT_INTERVAL: Duration = Duration::from_secs(30);
const EDIT_EVERY: Duration = Duration::from_secs(20);
const PROBE_EVERY: Duration = Duration::from_secs(2);
const CONCURRENCY: usize = 32;
const METRICS_ADDR: &str = "127.0.0.1:18477";
const CONTROLLER_SA: &str = "system:serviceaccount:nodetune-system:nodetune-controller";

fn node_name(i: usize) -> String {
    format!("bench-node-{i:05}")
}

/// A Node's metadata as a cloud cluster's nodes carry it: the selection's `pool` and `zone`,
/// the well-known labels, and the annotations the kubelet, kubeadm, the CNI and CSI drivers
/// write (about 0.9 KB in all).
fn node_metadata(i: usize) -> ObjectMeta {
    let name = node_name(i);
    let ip = format!("10.{}.{}.{}", 64 + i / 65_536, (i / 256) % 256, i % 256);
    let instance = format!("i-0{:016x}", 0x5eed_0000_u64 + i as u64);
    let labels = [
        ("pool", format!("p{}", i % POOLS)),
        ("zone", format!("z{}", i % ZONES)),
        ("kubernetes.io/hostname", name.clone()),
        ("kubernetes.io/os", "linux".into()),
        ("kubernetes.io/arch", "amd64".into()),
        ("beta.kubernetes.io/os", "linux".into()),
        ("beta.kubernetes.io/arch", "amd64".into()),
        ("node.kubernetes.io/instance-type", "m6i.2xlarge".into()),
        ("topology.kubernetes.io/region", "eu-west-1".into()),
        (
            "topology.kubernetes.io/zone",
            format!("eu-west-1{}", ['a', 'b', 'c'][i % ZONES]),
        ),
    ];
    let annotations = [
        (
            "kubeadm.alpha.kubernetes.io/cri-socket",
            "unix:///run/containerd/containerd.sock".to_string(),
        ),
        ("node.alpha.kubernetes.io/ttl", "0".into()),
        (
            "volumes.kubernetes.io/controller-managed-attach-detach",
            "true".into(),
        ),
        ("alpha.kubernetes.io/provided-node-ip", ip.clone()),
        ("projectcalico.org/IPv4Address", format!("{ip}/16")),
        (
            "projectcalico.org/IPv4VXLANTunnelAddr",
            format!("192.168.{}.{}", (i / 256) % 256, i % 256),
        ),
        (
            "csi.volume.kubernetes.io/nodeid",
            format!(r#"{{"ebs.csi.aws.com":"{instance}","efs.csi.aws.com":"{instance}"}}"#),
        ),
    ];
    ObjectMeta {
        name: Some(name),
        labels: Some(labels.into_iter().map(|(k, v)| (k.into(), v)).collect()),
        annotations: Some(
            annotations
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .collect(),
        ),
        ..Default::default()
    }
}

fn profile_name(j: usize) -> String {
    format!("bench-{j:02}")
}

fn pools_of(j: usize) -> [usize; 3] {
    [j % POOLS, (j + 1) % POOLS, (j + 3) % POOLS]
}

fn selects(j: usize, node: usize) -> bool {
    pools_of(j).contains(&(node % POOLS))
}

fn key(j: usize, k: usize) -> String {
    format!("net.bench.p{j}.k{k}")
}

/// The status an agent would write for node `i`, given each profile's generation the agent
/// acted on, and whether the probe key (profile 0's first key) failed.
fn report_status(i: usize, gens: &[i64], probe_failed: bool, beat: u64) -> NodeTuningReportStatus {
    let now = Time(Timestamp::now());
    let selecting: Vec<usize> = (0..gens.len()).filter(|j| selects(*j, i)).collect();
    // Highest index wins the shared key (stands for priority).
    let winner = selecting.last().copied();
    let mut sysctls = Vec::new();
    let mut profiles = Vec::new();
    for &j in &selecting {
        for k in 0..KEYS_PER_PROFILE {
            let failed = probe_failed && j == 0 && k == 0;
            sysctls.push(SysctlEntry {
                key: key(j, k),
                desired: Some(format!("{}", 1000 + k)),
                actual: Some(format!("{}", if failed { 0 } else { 1000 + k })),
                original: Some("0".into()),
                profile: Some(profile_name(j)),
                scope: Scope::NetworkNamespace,
                optional: false,
                state: if failed {
                    KeyState::Failed
                } else {
                    KeyState::Applied
                },
                message: failed.then(|| "write failed: Invalid argument (os error 22)".into()),
            });
        }
        profiles.push(AppliedProfile {
            name: profile_name(j),
            generation: gens[j],
            mode: Mode::Enforce,
            overridden_keys: if Some(j) == winner {
                vec![]
            } else {
                vec![SHARED_KEY.into()]
            },
            revision: None,
        });
    }
    if let Some(w) = winner {
        sysctls.push(SysctlEntry {
            key: SHARED_KEY.into(),
            desired: Some("65535".into()),
            actual: Some("65535".into()),
            original: Some("4096".into()),
            profile: Some(profile_name(w)),
            scope: Scope::NetworkNamespace,
            optional: false,
            state: KeyState::Applied,
            message: None,
        });
    }
    let applied = sysctls.len() as i32 - i32::from(probe_failed && selects(0, i));
    NodeTuningReportStatus {
        kernel_release: "6.18.0-bench".into(),
        profiles,
        sysctls,
        pod_sysctls: vec![],
        held_originals: vec![],
        drift_corrections: 0,
        warnings: vec![],
        tcp: tcp_counts(i, beat),
        sockstat: SockstatSummary {
            time_wait: 1000 + (i as i64 % 97),
            max_tw_buckets: 262_144,
            orphans: 0,
            inuse: 300,
            local_port_range: "32768 60999".into(),
            time_wait_overflows: Some(0),
        },
        summary: ReportSummary {
            profiles: selecting
                .iter()
                .map(|j| profile_name(*j))
                .collect::<Vec<_>>()
                .join(","),
            applied,
            failed: i32::from(probe_failed && selects(0, i)),
        },
        conditions: vec![],
        last_report_time: Some(now),
        ..Default::default()
    }
}

fn tcp_counts(i: usize, beat: u64) -> TcpCounts {
    let wobble = ((i as u64).wrapping_mul(31).wrapping_add(beat * 7) % 50) as i64;
    let v4: BTreeMap<String, i64> = [
        ("ESTABLISHED", 200 + wobble),
        ("TIME_WAIT", 1000 + wobble * 3),
        ("LISTEN", 12),
        ("CLOSE_WAIT", wobble % 3),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let v6: BTreeMap<String, i64> = [("ESTABLISHED", 20 + wobble), ("LISTEN", 4)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut total = v4.clone();
    for (k, v) in &v6 {
        *total.entry(k.clone()).or_default() += v;
    }
    TcpCounts {
        source: "netlink-single-walk".into(),
        ipv4: v4,
        ipv6: v6,
        total,
    }
}

fn profile(j: usize, edit: u64) -> NodeTuningProfile {
    let mut sysctls: BTreeMap<String, String> = (0..KEYS_PER_PROFILE)
        .map(|k| (key(j, k), format!("{}", 1000 + k)))
        .collect();
    sysctls.insert(SHARED_KEY.into(), "65535".into());
    // Edits change a value, which bumps the generation.
    sysctls.insert(key(j, 0), format!("{}", 1000 + edit));
    NodeTuningProfile {
        metadata: ObjectMeta {
            name: Some(profile_name(j)),
            ..Default::default()
        },
        spec: NodeTuningProfileSpec {
            node_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "pool".into(),
                    operator: "In".into(),
                    values: Some(pools_of(j).iter().map(|p| format!("p{p}")).collect()),
                }]),
                match_labels: None,
            }),
            pod_selector: None,
            namespace_selector: None,
            tolerations: vec![],
            sysctls,
            priority: j as i32,
            mode: Mode::Enforce,
            restore_on_removal: true,
            rollout: None,
            persist: false,
        },
        status: None,
    }
}

/// Runs `n` futures made by `f(i)` with bounded concurrency; fails on the first error.
async fn for_each_bounded<F, Fut>(n: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter((0..n).map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The API server's `apiserver_request_total`, summed per (verb, resource, subresource).
/// The harness runs without API Priority and Fairness, so there is no per-user figure; the
/// controller's share is what remains after the load generator's own requests.
async fn request_counts(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let key = format!(
            "{} {}/{}",
            label("verb"),
            label("resource"),
            label("subresource")
        );
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Keeps the agent pods out of the cluster (see the module docs): the fake nodes have no kubelet,
/// and creating 20,000 pods that never run is kube-controller-manager's load, not nodetune's.
async fn keep_agent_pods_out(client: &Client) -> anyhow::Result<()> {
    if std::env::var("NODETUNE_BENCH_AGENT_PODS").is_ok_and(|v| v == "1") {
        println!("agent pods allowed (NODETUNE_BENCH_AGENT_PODS=1)");
        return Ok(());
    }
    let quota = ResourceQuota {
        metadata: ObjectMeta {
            name: Some("bench-no-agent-pods".into()),
            ..Default::default()
        },
        spec: Some(ResourceQuotaSpec {
            hard: Some([("pods".to_string(), Quantity("0".into()))].into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<ResourceQuota>::namespaced(client.clone(), "nodetune-system")
        .create(&PostParams::default(), &quota)
        .await
        .context("creating the ResourceQuota that keeps agent pods out")?;
    Ok(())
}

/// The controller's `/metrics` text (plain HTTP/1.0 on loopback: no client crate needed).
/// Waits until `want` Nodes carry the agent label; returns when, from `since`.
async fn wait_for_labels(client: &Client, want: usize, since: Instant) -> anyhow::Result<Duration> {
    let nodes: Api<Node> = Api::all(client.clone());
    let params = kube::api::ListParams::default().labels("nodetune.dev/agent=true");
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let have = nodes.list_metadata(&params).await?.items.len();
        if have >= want {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{have} of {want} nodes labelled after 1200 s");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn controller_metrics() -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(METRICS_ADDR).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    Ok(body)
}

/// Cumulative bucket counts of one histogram family: (upper bound, count), ascending.
fn buckets(metrics: &str, family: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{family}_bucket{{le=\"");
    let mut v: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The `q` quantile of the observations between two scrapes of a histogram, interpolated
/// within the bucket as Prometheus' `histogram_quantile` does; and the observation count.
fn quantile_between(before: &str, after: &str, family: &str, q: f64) -> (Option<f64>, f64) {
    let (b, a) = (buckets(before, family), buckets(after, family));
    let d: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| {
            let was = b.iter().find(|(l, _)| l == le).map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = d.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return (None, 0.0);
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, n) in &d {
        if *n >= rank {
            if le.is_infinite() {
                return (Some(lower.0), total);
            }
            let within = (rank - lower.1) / (n - lower.1).max(f64::MIN_POSITIVE);
            return (Some(lower.0 + (le - lower.0) * within), total);
        }
        lower = (*le, *n);
    }
    (None, total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let m: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let steady = Duration::from_secs(args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(120));
    let n_profiles: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(10);
    let nodetune =
        std::env::var("NODETUNE_BIN").unwrap_or_else(|_| "target/release/nodetune".into());
    anyhow::ensure!(
        std::path::Path::new(&nodetune).is_file(),
        "{nodetune} not found: cargo build --release --bin nodetune"
    );
    let Some(bin) = support::cluster_prereqs("bench_controller") else {
        bail!("prerequisites missing (see above)");
    };
    let cluster = support::Cluster::start(&bin).await?;
    println!(
        "M = {m} nodes, {n_profiles} profiles, steady {} s; control plane up in {:.1} s",
        steady.as_secs(),
        cluster.startup_time().as_secs_f64()
    );
    // Everything of deploy/nodetune.yaml but the controller Deployment: this program starts
    // the controller itself.
    support::deploy::apply_all_but_controller(&cluster).await?;
    let client = cluster.client();
    keep_agent_pods_out(&client).await?;

    // Objects, as the cluster and the agents would have made them.
    let t = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    for_each_bounded(m, |i| {
        let nodes = nodes.clone();
        async move {
            let node = Node {
                metadata: node_metadata(i),
                ..Default::default()
            };
            nodes.create(&PostParams::default(), &node).await?;
            Ok(())
        }
    })
    .await
    .context("creating nodes")?;
    let profiles: Api<NodeTuningProfile> = Api::all(client.clone());
    for j in 0..n_profiles {
        profiles
            .create(&PostParams::default(), &profile(j, 0))
            .await
            .context("creating profiles")?;
    }
    let gens: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new(vec![1; n_profiles]));
    let reports: Api<NodeTuningReport> = Api::all(client.clone());
    let g0 = gens.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    let status_bytes = serde_json::to_vec(&report_status(0, &g0, false, 0))?.len();
    for_each_bounded(m, |i| {
        let reports = reports.clone();
        let g0 = g0.clone();
        async move {
            let mut r = NodeTuningReport::new(
                &node_name(i),
                NodeTuningReportSpec {
                    node_name: node_name(i),
                },
            );
            r = reports.create(&PostParams::default(), &r).await?;
            r.status = Some(report_status(i, &g0, false, 0));
            reports
                .replace_status(&node_name(i), &PostParams::default(), &r)
                .await?;
            Ok(())
        }
    })
    .await
    .context("creating reports")?;
    println!(
        "created {m} nodes, {m} reports (status ~{status_bytes} B, {} sysctl entries on node 0) and {n_profiles} profiles in {:.1} s",
        report_status(0, &g0, false, 0).sysctls.len(),
        t.elapsed().as_secs_f64()
    );
    let expected_matched: Vec<usize> = (0..n_profiles)
        .map(|j| (0..m).filter(|i| selects(j, *i)).count())
        .collect();

    // The controller, as its ServiceAccount.
    let kubeconfig_text = std::fs::read_to_string(cluster.kubeconfig())?;
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&kubeconfig_text)?;
    if let Some(users) = kc.get_mut("users").and_then(|u| u.as_sequence_mut()) {
        for u in users {
            if let Some(user) = u.get_mut("user").and_then(|u| u.as_mapping_mut()) {
                user.insert("as".into(), CONTROLLER_SA.into());
            }
        }
    }
    let kc_path = cluster.dir().join("controller.kubeconfig");
    std::fs::write(&kc_path, serde_yaml::to_string(&kc)?)?;
    let log = std::fs::File::create(cluster.dir().join("logs/bench-controller.log"))?;
    let requests_before_start = request_counts(&client).await?;
    let started = Instant::now();
    let mut controller = tokio::process::Command::new(&nodetune)
        .args(["controller", "--metrics-addr", METRICS_ADDR])
        .env("KUBECONFIG", &kc_path)
        .env("POD_NAMESPACE", "nodetune-system")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = controller.id().context("controller pid")?;

    // Status watch: the latest failedNodes of the probe profile, and every profile's status.
    let (failed_tx, mut failed_rx) = tokio::sync::watch::channel(-1i32);
    let statuses: Arc<Mutex<BTreeMap<String, NodeTuningProfile>>> = Arc::default();
    {
        let statuses = statuses.clone();
        let profiles = profiles.clone();
        let probe = profile_name(0);
        tokio::spawn(async move {
            let mut stream = watcher(profiles, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let objs = match ev {
                    Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                for p in objs {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if name == probe
                        && let Some(s) = &p.status
                    {
                        failed_tx.send_replace(s.failed_nodes);
                    }
                    if let Ok(mut map) = statuses.lock() {
                        map.insert(name, p);
                    }
                }
            }
        });
    }
    let complete = |map: &BTreeMap<String, NodeTuningProfile>, gens: &[i64]| {
        (0..n_profiles).all(|j| {
            map.get(&profile_name(j))
                .and_then(|p| p.status.as_ref().map(|s| (p.metadata.generation, s)))
                .is_some_and(|(g, s)| {
                    s.observed_generation == g
                        && g == Some(gens[j])
                        && s.matched_nodes as usize == expected_matched[j]
                        && s.applied_nodes as usize == expected_matched[j]
                })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = controller.try_wait()? {
            bail!(
                "controller exited: {status}; see {}/logs/bench-controller.log",
                cluster.dir().display()
            );
        }
        let done = statuses.lock().map(|m| complete(&m, &g0)).unwrap_or(false);
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("profiles not complete after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged = started.elapsed();
    let (hwm_initial, _, cpu_initial) = support::proc_usage(pid)?;
    let initial = delta(&request_counts(&client).await?, &requests_before_start);
    let requests_initial: f64 = initial.values().sum();
    println!("requests while the controller started (all clients; the load generator was idle):");
    for (k, v) in &initial {
        println!("  {k:<50} {v:>8.0}");
    }
    println!(
        "initial: every profile status complete {:.1} s after the controller started; peak RSS {:.1} MiB; CPU {:.1} s; {requests_initial:.0} API requests",
        converged.as_secs_f64(),
        hwm_initial as f64 / 1024.0,
        cpu_initial
    );

    // The first pass's node labels (one per selected node, a bounded number per pass) go on
    // after the statuses are complete; the steady phase starts once they are all written, so
    // it measures the controller at rest rather than its installation (and
    // kube-controller-manager's DaemonSet churn that each newly labelled node restarts).
    let to_label = (0..m)
        .filter(|i| (0..n_profiles).any(|j| selects(j, *i)))
        .count();
    let labelled_at = wait_for_labels(&client, to_label, started).await?;
    println!(
        "labelling: every selected node ({to_label}) labelled {:.1} s after the controller started",
        labelled_at.as_secs_f64()
    );

    // Steady state.
    let (_, rss_steady_start, cpu_steady_start) = support::proc_usage(pid)?;
    let requests_steady_start = request_counts(&client).await?;
    let metrics_steady_start = controller_metrics().await.unwrap_or_default();
    let steady_started = Instant::now();
    let stop = steady_started + steady;
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let write_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Heartbeats: every report once per HEARTBEAT, spread evenly.
    let heartbeats = {
        let reports = reports.clone();
        let (writes, write_errors) = (writes.clone(), write_errors.clone());
        tokio::spawn(async move {
            let every = HEARTBEAT.as_secs_f64() / m as f64;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
            while Instant::now() < stop {
                tick.tick().await;
                let i = (n as usize) % m;
                let beat = n / m as u64 + 1;
                n += 1;
                if i == 1 {
                    continue; // the probe node: its writes are the probe's
                }
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let (reports, writes, write_errors) =
                    (reports.clone(), writes.clone(), write_errors.clone());
                tokio::spawn(async move {
                    let patch = json!({"status": {
                        "tcp": tcp_counts(i, beat),
                        "lastReportTime": Time(Timestamp::now()),
                    }});
                    let r = reports
                        .patch_status(
                            &node_name(i),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await;
                    let c = if r.is_ok() { &writes } else { &write_errors };
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(permit);
                });
            }
        })
    };
    // Profile edits and the agents picking them up.
    let edits = {
        let (profiles, reports, gens) = (profiles.clone(), reports.clone(), gens.clone());
        let (writes, write_errors) = (writes.clone(), write_errors.clone());
        tokio::spawn(async move {
            let mut edit = 0u64;
            let mut pickups = Vec::new();
            while Instant::now() + EDIT_EVERY < stop && n_profiles > 1 {
                tokio::time::sleep(EDIT_EVERY).await;
                edit += 1;
                let j = 1 + (edit as usize - 1) % (n_profiles - 1);
                let p = profile(j, edit);
                let patch = json!({"spec": {"sysctls": p.spec.sysctls}});
                let Ok(updated) = profiles
                    .patch(
                        &profile_name(j),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                else {
                    continue;
                };
                if let (Some(g), Ok(mut gs)) = (updated.metadata.generation, gens.lock()) {
                    gs[j] = g;
                }
                let targets: Vec<usize> = (0..m).filter(|i| selects(j, *i) && *i != 1).collect();
                let (reports, gens) = (reports.clone(), gens.clone());
                let (writes, write_errors) = (writes.clone(), write_errors.clone());
                pickups.push(tokio::spawn(async move {
                    let every = AGENT_INTERVAL.as_secs_f64() / targets.len().max(1) as f64;
                    let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
                    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
                    for i in targets {
                        tick.tick().await;
                        let g = gens.lock().map(|g| g.clone()).unwrap_or_default();
                        let Ok(permit) = sem.clone().acquire_owned().await else {
                            break;
                        };
                        let (reports, writes, write_errors) =
                            (reports.clone(), writes.clone(), write_errors.clone());
                        tokio::spawn(async move {
                            let s = report_status(i, &g, false, 0);
                            let patch = json!({"status": {"profiles": s.profiles, "lastReportTime": s.last_report_time}});
                            let r = reports
                                .patch_status(&node_name(i), &PatchParams::default(), &Patch::Merge(&patch))
                                .await;
                            let c = if r.is_ok() { &writes } else { &write_errors };
                            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            drop(permit);
                        });
                    }
                }));
            }
            for p in pickups {
                let _ = p.await;
            }
            edit
        })
    };
    // Probes: node 1 is in pool p1, which profile 0 selects.
    let mut latencies = Vec::new();
    let (mut probe_timeouts, mut probe_skips) = (0, 0);
    let mut failed = false;
    while Instant::now() + PROBE_EVERY < stop {
        tokio::time::sleep(PROBE_EVERY).await;
        // Each probe asks for the opposite of what the status shows now, so only a real change
        // answers it (earlier runs flipped the node blindly: after a timed-out probe the next
        // one's wanted value already stood and counted as answered in 0.00 s). While the status
        // does not yet show the last write, there is nothing new to ask: skipped, not counted.
        let shown = *failed_rx.borrow();
        let want_failed = shown <= 0;
        if want_failed == failed {
            probe_skips += 1;
            continue;
        }
        failed = want_failed;
        let g = gens.lock().map(|g| g.clone()).unwrap_or_default();
        let s = report_status(1, &g, failed, 0);
        let want = i32::from(failed);
        let patch =
            json!({"status": {"sysctls": s.sysctls, "summary": s.summary, "profiles": s.profiles}});
        reports
            .patch_status(
                &node_name(1),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let t0 = Instant::now();
        match tokio::time::timeout(Duration::from_secs(30), failed_rx.wait_for(|v| *v == want))
            .await
        {
            Ok(Ok(_)) => latencies.push(t0.elapsed()),
            _ => probe_timeouts += 1,
        }
    }
    let _ = heartbeats.await;
    let n_edits = edits.await.unwrap_or(0);
    let steady_secs = steady_started.elapsed().as_secs_f64();
    let (hwm, rss_end, cpu_end) = support::proc_usage(pid)?;
    let steady_delta = delta(&request_counts(&client).await?, &requests_steady_start);
    let metrics_end = controller_metrics().await.unwrap_or_default();
    let own =
        |family: &str, q: f64| quantile_between(&metrics_steady_start, &metrics_end, family, q);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.0} ms", s * 1e3));
    let (own_p50, own_n) = own("nodetune_controller_report_to_status_patch_seconds", 0.5);
    let (own_p99, _) = own("nodetune_controller_report_to_status_patch_seconds", 0.99);
    let (rtt_p50, rtt_n) = own("nodetune_controller_status_patch_duration_seconds", 0.5);
    let (rtt_p99, _) = own("nodetune_controller_status_patch_duration_seconds", 0.99);
    println!(
        "controller's own latency, steady phase (report change of standing seen -> status patch sent): p50 {} / p99 {} over {own_n} patches; patch round trip p50 {} / p99 {} over {rtt_n}",
        ms(own_p50),
        ms(own_p99),
        ms(rtt_p50),
        ms(rtt_p99)
    );

    latencies.sort();
    let sizes: Vec<usize> = {
        let list = profiles.list(&Default::default()).await?;
        list.items
            .iter()
            .filter_map(|p| p.status.as_ref())
            .map(|s| serde_json::to_vec(s).map(|v| v.len()).unwrap_or(0))
            .collect()
    };
    let agent_writes = writes.load(std::sync::atomic::Ordering::Relaxed);
    let generator_requests = agent_writes as f64
        + write_errors.load(std::sync::atomic::Ordering::Relaxed) as f64
        + n_edits as f64
        + (latencies.len() + probe_timeouts) as f64
        + 2.0; // the profile list and the /metrics read above
    let all_steady: f64 = steady_delta.values().sum();
    let requests_steady = (all_steady - generator_requests).max(0.0);
    println!("requests in the steady phase, all clients:");
    for (k, v) in &steady_delta {
        println!("  {k:<50} {v:>8.0}");
    }
    println!(
        "steady {steady_secs:.0} s: {agent_writes} agent writes ({:.1}/s, {} failed), {n_edits} profile edits, {} probes answered ({probe_timeouts} timed out, {probe_skips} skipped: the last write not yet shown)",
        agent_writes as f64 / steady_secs,
        write_errors.load(std::sync::atomic::Ordering::Relaxed),
        latencies.len()
    );
    println!(
        "| M | report change → status: median | p99 | max | controller's own p99 (report → patch sent) | patch round trip p99 | controller peak RSS | RSS at end | CPU (steady) | API requests/s not from the load generator (steady) | initial convergence | initial requests | status size max |"
    );
    println!(
        "| {m} | {:.2} s | {:.2} s | {:.2} s | {} | {} | {:.1} MiB | {:.1} MiB (start {:.1}) | {:.1} % of a core | {:.2} | {:.1} s | {requests_initial:.0} | {} B |",
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.99).as_secs_f64(),
        latencies.last().copied().unwrap_or_default().as_secs_f64(),
        ms(own_p99),
        ms(rtt_p99),
        hwm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_steady_start as f64 / 1024.0,
        (cpu_end - cpu_steady_start) / steady_secs * 100.0,
        requests_steady / steady_secs,
        converged.as_secs_f64(),
        sizes.iter().max().copied().unwrap_or(0),
    );
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    drop(cluster);
    Ok(())
}
