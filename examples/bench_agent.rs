//! Benchmark: the agent's footprint on a node. Two parts:
//!
//! 1. **One tuning pass for 30 keys**, in-process, in a fresh network namespace (so only that
//!    namespace's keys change): the first pass (30 reads, 30 writes, the ledger's originals
//!    written and synced), a steady pass (30 reads, nothing to write: what every interval
//!    costs) and the restoring pass (30 writes back, the ledger emptied). Medians of ROUNDS
//!    cycles.
//! 2. **The real agent, idle, on a node holding many sockets.** A control plane
//!    (`tests/cluster/up`) with one simulated node per socket count (a network namespace), the
//!    operator deployed from `deploy/nodetune.yaml` with the release binary, and one profile of
//!    the same 30 keys selecting those nodes. Once every agent reports the profile applied, it
//!    measures each agent for a window without sockets, then makes the sockets in one node's
//!    namespace (`bench_tcpstat --hold`: ESTABLISHED pairs plus some TIME_WAIT, both families)
//!    and measures that node's agent for another window: peak and current RSS, CPU per pass and
//!    per minute, passes and report writes (from the agent's metrics). When
//!    `prometheus-node-exporter` is installed (`scripts/bench-agent` installs it), its `tcpstat`
//!    collector is scraped in the same namespace for comparison: it reads the whole netlink dump
//!    into memory before counting.
//!
//! 3. **`--pods N`: the real agent idle on a node hosting N pods** (instead of 2): pod
//!    counting and pod targeting on, N Pod objects bound to one node, each with a stand-in
//!    sandbox that `podnet` discovers as it does a real pod, and a pod profile selecting them
//!    (see `support/agent_pods.rs` and `support/pod_standins.rs`).
//!
//! ```sh
//! scripts/bench-agent                                 # as root, after tests/cluster/build
//! target/release/examples/bench_agent [SOCKETS ...]   # default 10000 1000000
//! scripts/bench-agent --pods 200                      # the agent with 200 pods
//! ```
//!
//! The agent runs with a 10 s interval and a 60 s heartbeat (the full socket walk happens once
//! per heartbeat, sockstat every pass), so a window of `NODETUNE_BENCH_WINDOW_SECS` (default
//! 180) holds about 18 passes and 3 walks.

#[path = "support/pod_standins.rs"]
mod pod_standins;
#[path = "support/agent_pods.rs"]
mod pods;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::PostParams;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use nodetune::agent::tuner::Tuner;
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport};
use nodetune::sysctl::{Ledger, SysctlFs};

const PROFILE: &str = "bench-30-keys";
const LABEL: (&str, &str) = ("nodetune.bench/agent", "yes");
const INTERVAL: &str = "10s";
const HEARTBEAT: &str = "60s";
const IN_NETNS_ENV: &str = "NODETUNE_BENCH_IN_NETNS";

/// 30 network-namespace keys, each writable in a fresh namespace of this kernel, every value
/// different from the namespace's default so the first pass really writes all 30. None of them is one of
/// the keys `bench_tcpstat --hold` sets for its sockets.
const KEYS: [(&str, &str); 30] = [
    ("net.ipv4.tcp_fin_timeout", "30"),
    ("net.ipv4.tcp_keepalive_time", "600"),
    ("net.ipv4.tcp_keepalive_intvl", "30"),
    ("net.ipv4.tcp_keepalive_probes", "5"),
    ("net.ipv4.tcp_syncookies", "2"),
    ("net.ipv4.tcp_synack_retries", "3"),
    ("net.ipv4.tcp_syn_retries", "3"),
    ("net.ipv4.tcp_retries2", "8"),
    ("net.ipv4.tcp_orphan_retries", "2"),
    ("net.ipv4.tcp_slow_start_after_idle", "0"),
    ("net.ipv4.tcp_mtu_probing", "1"),
    ("net.ipv4.tcp_no_metrics_save", "1"),
    ("net.ipv4.tcp_fastopen", "3"),
    ("net.ipv4.tcp_rfc1337", "1"),
    ("net.ipv4.tcp_notsent_lowat", "131072"),
    ("net.ipv4.tcp_rmem", "4096 131072 6291456"),
    ("net.ipv4.tcp_wmem", "4096 65536 4194304"),
    ("net.ipv4.tcp_app_win", "30"),
    ("net.ipv4.tcp_ecn", "1"),
    ("net.ipv4.tcp_dsack", "0"),
    ("net.ipv4.tcp_thin_linear_timeouts", "1"),
    ("net.ipv4.tcp_adv_win_scale", "2"),
    ("net.ipv4.ip_default_ttl", "63"),
    ("net.ipv4.icmp_ratelimit", "100"),
    ("net.ipv4.tcp_max_reordering", "400"),
    ("net.ipv4.tcp_min_snd_mss", "536"),
    ("net.ipv4.tcp_base_mss", "1280"),
    ("net.ipv4.tcp_reordering", "4"),
    ("net.ipv4.tcp_autocorking", "0"),
    ("net.ipv4.tcp_limit_output_bytes", "1048576"),
];

fn profile() -> NodeTuningProfile {
    let mut p = NodeTuningProfile::new(
        PROFILE,
        NodeTuningProfileSpec {
            node_selector: Some(LabelSelector {
                match_labels: Some([(LABEL.0.to_string(), LABEL.1.to_string())].into()),
                ..Default::default()
            }),
            sysctls: KEYS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    );
    p.metadata.generation = Some(1);
    p
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Part 1, in the fresh namespace this process was re-executed in.
fn tuning_pass(rounds: usize) -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let fs = SysctlFs::default();
    let p = profile();
    let wanted = nodetune::plan::merge([&p]);
    let nothing = nodetune::plan::merge(std::iter::empty::<&NodeTuningProfile>());
    let mut ledger = Ledger::load(state.path())?.ledger;
    let mut tuner = Tuner::with_policy_file(None);
    let (mut first, mut steady, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let out = tuner.pass(&fs, &mut ledger, &wanted, &[&p]);
        first.push(t.elapsed());
        let applied = out
            .results
            .iter()
            .filter(|r| r.state == KeyState::Applied)
            .count();
        if applied != KEYS.len() {
            bail!(
                "{applied} of {} keys applied: {:?}",
                KEYS.len(),
                out.warnings
            );
        }
        for _ in 0..10 {
            let t = Instant::now();
            let out = tuner.pass(&fs, &mut ledger, &wanted, &[&p]);
            steady.push(t.elapsed());
            if out.drifted != 0 || out.results.iter().any(|r| r.changed) {
                bail!("a steady pass wrote something");
            }
        }
        let t = Instant::now();
        let out = tuner.pass(&fs, &mut ledger, &nothing, &[]);
        restore.push(t.elapsed());
        if out.restores != KEYS.len() as u64 {
            bail!("{} of {} keys restored", out.restores, KEYS.len());
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "one tuning pass for {} keys, in-process, median of {rounds} cycles:",
        KEYS.len()
    );
    println!("| pass | median | per key |\n|---|---|---|");
    for (name, v) in [
        ("first (write 30, ledger synced)", &mut first),
        ("steady (read 30, nothing to write)", &mut steady),
        ("restore (write 30 back, ledger emptied)", &mut restore),
    ] {
        let m = median(v);
        println!(
            "| {name} | {:.3} ms | {:.1} µs |",
            ms(m),
            m.as_secs_f64() * 1e6 / KEYS.len() as f64
        );
    }
    Ok(())
}

/// Re-runs this program in a fresh network namespace for part 1.
fn tuning_pass_in_fresh_netns(rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new("unshare")
        .arg("--net")
        .arg(exe)
        .args(["--tuning-pass", &rounds.to_string()])
        .env(IN_NETNS_ENV, "1")
        .status()
        .context("run unshare --net")?;
    if !status.success() {
        bail!("the tuning-pass child failed ({status})");
    }
    Ok(())
}

/// The agent process in a node's namespace: `nodetune agent`, found by its namespace.
fn agent_pid(node: &support::SimNode) -> anyhow::Result<u32> {
    let ns = node.netns_inode()?;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with(b"nodetune"))
            && args.get(1) == Some(&&b"agent"[..]);
        if is_agent && support::cluster::process_netns_inode(pid).ok() == Some(ns) {
            return Ok(pid);
        }
    }
    bail!("no agent process in {}", node.netns)
}

/// The agent's counters (`nodetune_agent_*_total`) from its metrics endpoint.
async fn agent_counters(node: &support::SimNode) -> anyhow::Result<BTreeMap<String, f64>> {
    // The chart binds the agent to the node's address (agent.metricsBindAddress: hostIP).
    let url = format!("http://{}:9477/metrics", node.ip);
    let text = node.exec_ok(&["curl", "-sf", url.as_str()]).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("nodetune_agent_") && l.contains("_total "))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

struct Window {
    hwm_kib: u64,
    rss_kib: u64,
    /// Smallest and largest RSS seen, sampled every [`RSS_EVERY`] through the window.
    rss_range_kib: (u64, u64),
    cpu_secs: f64,
    secs: f64,
    passes: f64,
    writes: f64,
    /// What the RSS is made of at the end: `RssAnon`, `RssFile` (the binary's pages, mostly)
    /// and the thread count, from `/proc/<pid>/status`.
    makeup: String,
}

/// The agent's `RssAnon`, `RssFile` and `Threads`, as one line.
fn rss_makeup(pid: u32) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(format!(
        "RssAnon {:.1} MiB, RssFile {:.1} MiB, {} threads; by mapping: {}",
        field("RssAnon:") as f64 / 1024.0,
        field("RssFile:") as f64 / 1024.0,
        field("Threads:"),
        rss_by_mapping(pid)?
    ))
}

/// Resident memory by mapping from `/proc/<pid>/smaps`: the heap (`[heap]`, the main arena),
/// other anonymous mappings (thread arenas and stacks), the binary's own file pages and the
/// shared libraries'. Says where an RSS that grew went.
fn rss_by_mapping(pid: u32) -> anyhow::Result<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = exe.to_string_lossy();
    let mut kib: BTreeMap<&str, u64> = BTreeMap::new();
    let mut group = "anonymous";
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: address, perms, offset, dev, inode, then the name if any.
            group = match fields.nth(4) {
                None => "anonymous",
                Some("[heap]") => "heap",
                Some(name) if name.starts_with('[') => "other kernel-named",
                Some(name) if name == exe => "binary",
                Some(_) => "libraries",
            };
        } else if first == "Rss:" {
            *kib.entry(group).or_default() +=
                fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    Ok(kib
        .iter()
        .map(|(g, k)| format!("{g} {:.1} MiB", *k as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", "))
}

/// How often a window samples the agent's RSS.
const RSS_EVERY: Duration = Duration::from_secs(2);

/// Watches one agent for `secs`.
async fn measure(node: &support::SimNode, secs: u64) -> anyhow::Result<Window> {
    let pid = agent_pid(node)?;
    let (_, rss0, cpu0) = support::proc_usage(pid)?;
    let c0 = agent_counters(node).await?;
    let t = Instant::now();
    let end = t + Duration::from_secs(secs);
    let mut range = (rss0, rss0);
    while Instant::now() < end {
        tokio::time::sleep(RSS_EVERY.min(end.saturating_duration_since(Instant::now()))).await;
        // An agent that exited mid-window is caught below; a missed sample is no figure.
        if let Ok((_, rss, _)) = support::proc_usage(pid) {
            range = (range.0.min(rss), range.1.max(rss));
        }
    }
    if agent_pid(node)? != pid {
        bail!("the agent on {} restarted during the window", node.name);
    }
    let (hwm, rss, cpu1) = support::proc_usage(pid)?;
    let makeup = rss_makeup(pid)?;
    let c1 = agent_counters(node).await?;
    let d = |k: &str| c1.get(k).copied().unwrap_or(0.0) - c0.get(k).copied().unwrap_or(0.0);
    Ok(Window {
        hwm_kib: hwm,
        rss_kib: rss,
        rss_range_kib: (range.0.min(rss), range.1.max(rss)),
        cpu_secs: cpu1 - cpu0,
        secs: t.elapsed().as_secs_f64(),
        passes: d("nodetune_agent_passes_total"),
        writes: d("nodetune_agent_report_writes_total"),
        makeup,
    })
}

fn print_window(what: &str, w: &Window) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| {what} | {:.1} MiB | {:.1} MiB ({:.1}–{:.1}) | {:.0} | {:.0} | {:.2} % of a core | {:.1} ms |",
        mib(w.hwm_kib),
        mib(w.rss_kib),
        mib(w.rss_range_kib.0),
        mib(w.rss_range_kib.1),
        w.passes,
        w.writes,
        100.0 * w.cpu_secs / w.secs.max(1.0),
        1e3 * w.cpu_secs / w.passes.max(1.0),
    );
    println!("  ({}: {})", what, w.makeup);
}

/// Sockets held in a node's namespace by `bench_tcpstat --hold` (released on drop).
struct Held {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    total: u64,
}

impl Held {
    async fn start(node: &support::SimNode, sockets: usize) -> anyhow::Result<Held> {
        let holder = std::env::var("NODETUNE_BENCH_TCPSTAT")
            .unwrap_or_else(|_| "target/release/examples/bench_tcpstat".into());
        anyhow::ensure!(
            Path::new(&holder).is_file(),
            "{holder} not found: cargo build --release --example bench_tcpstat"
        );
        // Mostly ESTABLISHED (a busy proxy's bulk); TIME_WAIT expires after 60 s, so a tenth,
        // at most 20,000, made last.
        let time_wait = (sockets / 10).min(20_000);
        let established = sockets - time_wait;
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &node.netns, &holder, "--hold"])
            .args([established.to_string(), time_wait.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start bench_tcpstat --hold")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(1800), lines.next_line())
            .await
            .context("making the sockets took over 30 min")??
            .unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"ready") {
            bail!("bench_tcpstat --hold said {line:?}");
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        println!(
            "{}: {} sockets held ({} ESTABLISHED, {} TIME_WAIT), made in {} s + {} s",
            node.name,
            num(1),
            num(2),
            num(3),
            f.get(4).unwrap_or(&"?"),
            f.get(5).unwrap_or(&"?")
        );
        Ok(Held {
            child,
            stdin,
            total: num(1),
        })
    }

    async fn release(mut self) -> anyhow::Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            stdin.shutdown().await.ok();
        }
        tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .context("the socket holder did not exit")??;
        Ok(())
    }
}

/// node_exporter with only its tcpstat collector, in the node's namespace: peak RSS after
/// `scrapes` scrapes and the median scrape time. `Ok(None)` when it is not installed; an error
/// (with its log) when it does not serve.
async fn node_exporter(
    node: &support::SimNode,
    scrapes: usize,
    log: &Path,
) -> anyhow::Result<Option<(f64, Duration)>> {
    let Some(bin) = ["prometheus-node-exporter", "node_exporter"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok()
        })
    else {
        return Ok(None);
    };
    let out = std::fs::File::create(log)?;
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &node.netns, bin])
        .args([
            "--collector.disable-defaults",
            "--collector.tcpstat",
            &format!("--web.listen-address={}:19100", node.ip),
        ])
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("node_exporter pid")?;
    // The node's bridge address: with a million sockets on loopback, 127.0.0.1:19100 may well
    // be some client's local port already.
    let url = &format!("http://{}:19100/metrics", node.ip);
    let result = async {
        // Listening takes a moment; the first scrape that answers is not timed.
        support::wait_for(
            "node_exporter to serve",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                anyhow::Ok(
                    node.exec_ok(&["curl", "-sf", "-o", "/dev/null", url])
                        .await
                        .ok(),
                )
            },
        )
        .await?;
        let mut times = Vec::new();
        for _ in 0..scrapes {
            let t = Instant::now();
            let text = node.exec_ok(&["curl", "-sf", url]).await?;
            times.push(t.elapsed());
            if !text.contains("node_tcp_connection_states") {
                bail!("node_exporter exported no node_tcp_connection_states");
            }
        }
        let (hwm, _, _) = support::proc_usage(pid)?;
        anyhow::Ok((hwm as f64 / 1024.0, median(&mut times)))
    }
    .await;
    child.kill().await.ok();
    match result {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!("{e:#}; node_exporter's log ends: {:?}", tail)
        }
    }
}

async fn report_total(client: &kube::Client, node: &str) -> anyhow::Result<i64> {
    let r = Api::<NodeTuningReport>::all(client.clone())
        .get(node)
        .await?;
    Ok(r.status
        .map(|s| s.tcp.total.values().sum::<i64>())
        .unwrap_or_default())
}

/// The operator as shipped on `cluster`, agents at [`INTERVAL`] and [`HEARTBEAT`], the 30-key
/// profile created; returns once every node in `nodes` reports the 30 keys applied.
async fn deploy_operator(
    cluster: &support::Cluster,
    nodetune: &Path,
    nodes: &[support::SimNode],
) -> anyhow::Result<()> {
    cluster.start_shim(nodetune)?;
    let mut deploy = support::deploy::apply_all_but_controller(cluster).await?;
    support::deploy::set_env(
        support::deploy::controller_container(&mut deploy)?,
        &[
            ("NODETUNE_AGENT_INTERVAL", INTERVAL),
            ("NODETUNE_AGENT_HEARTBEAT", HEARTBEAT),
        ],
    );
    support::deploy::create_controller(cluster, &deploy).await?;
    let client = cluster.client();
    Api::<NodeTuningProfile>::all(client.clone())
        .create(&PostParams::default(), &profile())
        .await?;
    let reports = Api::<NodeTuningReport>::all(client);
    for node in nodes {
        wait_report(
            &reports,
            &node.name,
            &format!("all {} keys applied", KEYS.len()),
            Duration::from_secs(180),
            |s| {
                let applied = s
                    .sysctls
                    .iter()
                    .filter(|e| e.state == KeyState::Applied)
                    .count();
                applied == KEYS.len()
            },
        )
        .await?;
    }
    Ok(())
}

/// Waits until `node`'s report status satisfies `done`.
async fn wait_report(
    reports: &Api<NodeTuningReport>,
    node: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&nodetune::api::NodeTuningReportStatus) -> bool,
) -> anyhow::Result<()> {
    let done = &done;
    support::wait_for(
        &format!("{node} reports {what}"),
        within,
        Duration::from_secs(1),
        || async move {
            let r = reports.get(node).await?;
            anyhow::Ok(r.status.as_ref().is_some_and(done).then_some(()))
        },
    )
    .await
}

fn header() {
    println!(
        "| agent | peak RSS | RSS at the end (min–max, sampled every {} s) | passes | report writes | CPU | CPU per pass |\n|---|---|---|---|---|---|---|",
        RSS_EVERY.as_secs()
    );
}

/// The socket benchmark: one node per socket count, idle, then holding its sockets.
async fn run_sockets(nodetune: &Path, sizes: &[usize], window: u64) -> anyhow::Result<()> {
    tuning_pass_in_fresh_netns(20)?;
    let Some(bin) = support::cluster_prereqs("bench_agent") else {
        bail!("prerequisites missing (see above)");
    };
    let cluster = support::Cluster::start(&bin).await?;
    let mut nodes = Vec::new();
    for s in sizes {
        nodes.push(cluster.add_node(&format!("node-{s}"), &[LABEL]).await?);
    }
    deploy_operator(&cluster, nodetune, &nodes).await?;
    let client = cluster.client();
    println!(
        "agents ({}, interval {INTERVAL}, heartbeat {HEARTBEAT}) applied {} keys on {} nodes; windows of {window} s",
        nodetune.display(),
        KEYS.len(),
        nodes.len()
    );
    header();
    // Every agent idle at once: one window for all.
    let idle = futures::future::try_join_all(nodes.iter().map(|n| measure(n, window))).await?;
    for (node, w) in nodes.iter().zip(&idle) {
        print_window(&format!("{}, no sockets", node.name), w);
    }
    for (node, size) in nodes.iter().zip(sizes) {
        let held = Held::start(node, *size).await?;
        let w = measure(node, window).await?;
        print_window(&format!("{}, {} sockets", node.name, held.total), &w);
        let reported = report_total(&client, &node.name).await?;
        println!(
            "  {}'s report counts {reported} sockets (held {}, plus the agent's own)",
            node.name, held.total
        );
        let log = cluster
            .dir()
            .join(format!("logs/node-exporter-{}.log", node.name));
        match node_exporter(node, 3, &log).await {
            Ok(Some((hwm, scrape))) => println!(
                "  node_exporter --collector.tcpstat on {}: peak RSS {hwm:.1} MiB, scrape median {:.0} ms",
                node.name,
                scrape.as_secs_f64() * 1e3
            ),
            Ok(None) => println!("  node_exporter not installed: no comparison"),
            // The comparison is optional; the agent's figures above stand.
            Err(e) => println!("  node_exporter failed on {}: {e:#}", node.name),
        }
        held.release().await?;
    }
    Ok(())
}

/// What to run, from the command line.
enum Mode {
    TuningPass(usize),
    Sockets(Vec<usize>),
    Pods(usize),
}

fn mode(args: &[String]) -> anyhow::Result<Mode> {
    let count = |a: &String| a.replace('_', "").parse::<usize>();
    Ok(match args.first().map(String::as_str) {
        Some("--tuning-pass") => {
            Mode::TuningPass(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20))
        }
        Some("--pods") => {
            let n = args.get(1).context("--pods needs a count")?;
            Mode::Pods(count(n).with_context(|| format!("--pods {n:?}"))?)
        }
        None => Mode::Sockets(vec![10_000, 1_000_000]),
        Some(_) => Mode::Sockets(
            args.iter()
                .map(count)
                .collect::<Result<_, _>>()
                .context("socket counts")?,
        ),
    })
}

/// Resolves on SIGINT or SIGTERM (`timeout` sends the latter), so the benchmark returns and
/// its guards (stand-ins, cluster) clean up.
async fn stopped() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    bail!("stopped by a signal; cleaning up")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = mode(&args)?;
    if let Mode::TuningPass(rounds) = mode {
        return tuning_pass(rounds);
    }
    let window: u64 = std::env::var("NODETUNE_BENCH_WINDOW_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let nodetune =
        std::env::var("NODETUNE_BIN").unwrap_or_else(|_| "target/release/nodetune".into());
    anyhow::ensure!(
        Path::new(&nodetune).is_file(),
        "{nodetune} not found: cargo build --release --bin nodetune"
    );
    let nodetune = std::fs::canonicalize(&nodetune)?;
    let run = async {
        match mode {
            Mode::Pods(n) => pods::run(&nodetune, n, window).await,
            Mode::Sockets(sizes) => run_sockets(&nodetune, &sizes, window).await,
            Mode::TuningPass(_) => Ok(()),
        }
    };
    tokio::select! {
        r = run => r,
        r = stopped() => r,
    }
}
