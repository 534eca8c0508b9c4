//! Faults, end to end on a real control plane with real agents (issue 10): the apiserver and
//! etcd going away, agents SIGKILLed while they apply and restore, a node deleted, the leading
//! controller killed during a rollout, and a burst of edits.
//!
//! Layout of every cluster: two "infra" nodes that run only the two controller replicas (one
//! each, so killing a leader's node kills nothing else) and a few "web" nodes that profiles
//! select, where the agents run. Only network-namespace keys (`net.ipv4.*`) are tuned: the
//! simulated nodes share this machine's kernel for everything else. Each test is one cluster
//! and runs named steps in order, each leaving the state the next starts from.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Affinity, Event, Node, Pod, PodAntiAffinity};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile};
use nodetune::conditions::{Type, find, is_true};
use nodetune::names::{AGENT_NODE_LABEL, DAEMONSET_NAME};
use support::e2e::{Env, NS, POLL, Restarts, WAIT};
use support::fixtures::{ROLE, counts, map, profile, ready_at, report_generation};
use support::shim::ProcRecord;
use support::{SimNode, deploy, faults, http_get};

const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
/// The controller's Lease duration (src/controller/leader.rs).
const LEASE: Duration = Duration::from_secs(15);

/// `workers` web nodes (`node-1`, ...), two infra nodes (`ctl-1`, `ctl-2`) for the
/// controllers, a shim that restarts a killed container within a second, and nodetune.
async fn setup(test: &str, workers: usize) -> Result<Option<Env>> {
    let names: Vec<String> = (1..=workers).map(|i| format!("node-{i}")).collect();
    let mut nodes = vec![("ctl-1", "infra"), ("ctl-2", "infra")];
    nodes.extend(names.iter().map(|n| (n.as_str(), "web")));
    Env::start_with(test, &nodes, Restarts::Quick, controllers_on_infra_nodes).await
}

/// The shipped Deployment (two replicas), with short intervals, pinned to the infra nodes,
/// one replica per node (each binds the metrics port of its node).
fn controllers_on_infra_nodes(deployment: &mut Deployment) -> Result<()> {
    let pod = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .context("deployment has a pod template")?;
    pod.node_selector = Some([(ROLE.to_string(), "infra".to_string())].into());
    let term = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .and_then(|p| p.first())
        .map(|w| w.pod_affinity_term.clone())
        .context("the shipped anti-affinity term")?;
    pod.affinity = Some(Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..Default::default()
        }),
        ..Default::default()
    });
    deploy::set_env(
        deploy::controller_container(deployment)?,
        &[
            ("NODETUNE_AGENT_INTERVAL", "2s"),
            ("NODETUNE_AGENT_HEARTBEAT", "4s"),
            ("NODETUNE_DEBOUNCE", "200ms"),
            ("NODETUNE_FINALIZER_TIMEOUT", "120s"),
        ],
    );
    Ok(())
}

/// A profile selecting the web nodes, restoring on removal.
fn web(name: &str, sysctls: &[(&str, &str)]) -> NodeTuningProfile {
    profile(name).role("web").sysctls(sysctls).build()
}

/// The web nodes, where the agents run.
fn workers(env: &Env) -> Vec<SimNode> {
    env.nodes_named("node-").into_iter().cloned().collect()
}

fn is_agent(r: &ProcRecord, node: &str) -> bool {
    r.namespace == NS && r.node == node && r.pod.starts_with(DAEMONSET_NAME)
}

/// Waits until every web node holds every value of `want`.
async fn wait_workers_hold(env: &Env, want: &BTreeMap<String, String>) -> Result<()> {
    for n in workers(env) {
        env.wait_sysctls(&n.name, want).await?;
    }
    Ok(())
}

/// Waits for every worker's report to show `profile` at `generation`, written after `since`,
/// with every key Applied.
async fn wait_reports_at(
    env: &Env,
    profile: &str,
    generation: i64,
    since: Timestamp,
) -> Result<()> {
    for node in workers(env) {
        let what = format!(
            "{}'s report at {profile} generation {generation}",
            node.name
        );
        env.wait(&what, || async {
            let r = env.reports().get(&node.name).await?;
            let fresh = r
                .status
                .as_ref()
                .and_then(|s| s.last_report_time.as_ref())
                .is_some_and(|t| t.0 > since);
            let all_applied = r.status.as_ref().is_some_and(|s| {
                !s.sysctls.is_empty() && s.sysctls.iter().all(|e| e.state == KeyState::Applied)
            });
            Ok(
                (fresh && all_applied && report_generation(&r, profile) == Some(generation))
                    .then_some(()),
            )
        })
        .await?;
    }
    Ok(())
}

/// The running agent process on a node (as the shim runs it), at start `min_starts` or later.
async fn wait_agent_running(env: &Env, node: &str, min_starts: u32) -> Result<ProcRecord> {
    support::wait_for(
        &format!("agent on {node} running (start #{min_starts} or later)"),
        WAIT,
        Duration::from_millis(50),
        || async {
            Ok(faults::running_record(&env.cluster, |r| {
                is_agent(r, node) && r.starts >= min_starts
            }))
        },
    )
    .await
    .map_err(|e| env.fail(e))
}

async fn controller_pods(env: &Env) -> Result<Vec<Pod>> {
    let by_component = ListParams::default().labels(CONTROLLER_SELECTOR);
    Ok(env.in_ns::<Pod>().list(&by_component).await?.items)
}

async fn lease(env: &Env) -> Result<Lease> {
    Ok(env.in_ns::<Lease>().get("nodetune-controller").await?)
}

fn holder(l: &Lease) -> Option<String> {
    l.spec.as_ref()?.holder_identity.clone()
}

fn transitions(l: &Lease) -> i32 {
    l.spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
}

/// Sum of the samples of a counter family in a Prometheus text exposition.
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const FIN: &str = "net.ipv4.tcp_fin_timeout";
const KEEPALIVE: &str = "net.ipv4.tcp_keepalive_time";

/// kube-apiserver stopped for 30 s, then etcd restarted: agents keep their nodes tuned and
/// correct drift while the API is away, reconnect (they act on edits made afterwards), reports
/// and status converge; nothing panics and nothing restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn apiserver_outage_and_etcd_restart() -> Result<()> {
    let Some(env) = setup("apiserver_outage_and_etcd_restart", 2).await? else {
        return Ok(());
    };
    let g1 = env
        .apply(&web("outage", &[(FIN, "31"), (KEEPALIVE, "601")]))
        .await?;
    let want = map(&[(FIN, "31"), (KEEPALIVE, "601")]);
    wait_workers_hold(&env, &want).await?;
    env.wait_profile("outage", "Ready, applied on 2", |p| {
        ready_at(p, g1) && counts(p) == (2, 2, 0)
    })
    .await?;
    let drift_before = drift_corrections(&env).await?;
    let back = drift_is_corrected_while_the_apiserver_is_stopped(&env, &want).await?;
    reports_catch_up_and_count_the_corrections(&env, g1, back, &drift_before).await?;
    an_edit_after_the_outage_reaches_kernels_and_status(&env).await?;
    an_edit_after_an_etcd_restart_converges(&env).await?;
    nothing_panicked_or_restarted(&env)
}

/// Node name → drift corrections its report counts.
async fn drift_corrections(env: &Env) -> Result<BTreeMap<String, i64>> {
    let mut counted = BTreeMap::new();
    for n in workers(env) {
        let r = env.reports().get(&n.name).await?;
        counted.insert(n.name, r.status.map(|s| s.drift_corrections).unwrap_or(0));
    }
    Ok(counted)
}

/// The apiserver goes away for 30 s: drift on every node is corrected with no API to talk
/// to, and the agents keep serving metrics. Returns when the API was back.
async fn drift_is_corrected_while_the_apiserver_is_stopped(
    env: &Env,
    want: &BTreeMap<String, String>,
) -> Result<Timestamp> {
    let outage = Duration::from_secs(30);
    let apiserver =
        faults::stop_component(&env.cluster, "kube-apiserver", Duration::from_secs(10)).await?;
    let stopped_at = Instant::now();
    let during = async {
        ensure!(
            env.profiles().get("outage").await.is_err(),
            "the API still answers with kube-apiserver stopped"
        );
        for n in workers(env) {
            env.set_sysctl(&n.name, FIN, "77").await?;
        }
        for n in workers(env) {
            env.wait_sysctls_for(&n.name, want, Duration::from_secs(20))
                .await?;
        }
        ensure!(
            !faults::alive(faults::component_pid(&env.cluster, "kube-apiserver")?),
            "the drift must be corrected while the API is down"
        );
        let metrics = http_get(&format!("{}:9477", env.node("node-1").ip), "/metrics").await?;
        ensure!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        anyhow::Ok(())
    }
    .await;
    let corrected_in = stopped_at.elapsed();
    if let Some(rest) = outage.checked_sub(stopped_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // Always restart, whatever happened, so the failure output has a working cluster.
    apiserver.start()?;
    faults::wait_apiserver_ready(&env.cluster, WAIT)
        .await
        .map_err(|e| env.fail(e))?;
    let back = Timestamp::now();
    during.context("while kube-apiserver was stopped")?;
    eprintln!("drift corrected {corrected_in:?} into the outage; API back");
    Ok(back)
}

/// Reports catch up: fresh, drift corrections counted, the same generation applied.
async fn reports_catch_up_and_count_the_corrections(
    env: &Env,
    generation: i64,
    back: Timestamp,
    drift_before: &BTreeMap<String, i64>,
) -> Result<()> {
    wait_reports_at(env, "outage", generation, back).await?;
    for (node, corrections) in drift_corrections(env).await? {
        assert!(
            corrections > drift_before[&node],
            "{node}: drift corrections {corrections}, before the outage {}",
            drift_before[&node]
        );
    }
    Ok(())
}

/// Reconnected: an edit made now reaches the kernels and the status.
async fn an_edit_after_the_outage_reaches_kernels_and_status(env: &Env) -> Result<()> {
    let g2 = env
        .apply(&web("outage", &[(FIN, "32"), (KEEPALIVE, "601")]))
        .await?;
    wait_workers_hold(env, &map(&[(FIN, "32"), (KEEPALIVE, "601")])).await?;
    env.wait_profile("outage", "Ready at the edit after the outage", |p| {
        ready_at(p, g2) && counts(p) == (2, 2, 0)
    })
    .await?;
    Ok(())
}

/// etcd restarted under the apiserver: an edit afterwards reaches kernels, reports and status.
async fn an_edit_after_an_etcd_restart_converges(env: &Env) -> Result<()> {
    let etcd = faults::stop_component(&env.cluster, "etcd", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.start()?;
    faults::wait_apiserver_ready(&env.cluster, WAIT)
        .await
        .map_err(|e| env.fail(e))?;
    let back = Timestamp::now();
    let g3 = env
        .apply(&web("outage", &[(FIN, "33"), (KEEPALIVE, "602")]))
        .await?;
    wait_workers_hold(env, &map(&[(FIN, "33"), (KEEPALIVE, "602")])).await?;
    wait_reports_at(env, "outage", g3, back).await?;
    env.wait_profile("outage", "Ready after the etcd restart", |p| {
        ready_at(p, g3) && counts(p) == (2, 2, 0)
    })
    .await?;
    Ok(())
}

/// No panic anywhere, no process restarted, the rest of the control plane still up.
fn nothing_panicked_or_restarted(env: &Env) -> Result<()> {
    let panics = faults::panics(&env.cluster);
    assert!(panics.is_empty(), "panics: {panics:#?}");
    let records = env.cluster.with_shim(|s| s.records());
    let agents = records
        .iter()
        .filter(|r| r.pod.starts_with(DAEMONSET_NAME))
        .count();
    let controllers = records
        .iter()
        .filter(|r| r.pod.starts_with("nodetune-controller"))
        .count();
    assert_eq!((agents, controllers), (2, 2), "{records:#?}");
    for r in &records {
        assert!(
            r.running && r.starts == 1,
            "{}/{} on {} restarted or stopped: starts {}, last exit {:?}",
            r.namespace,
            r.pod,
            r.node,
            r.starts,
            r.last_exit
        );
    }
    for c in ["kube-controller-manager", "kube-scheduler"] {
        assert!(
            faults::alive(faults::component_pid(&env.cluster, c)?),
            "{c} died during the outage"
        );
    }
    Ok(())
}

/// Keys an agent is killed while applying and restoring, with two sets of values other than
/// the kernel's defaults.
const CHURN: &[(&str, &str, &str)] = &[
    ("net.ipv4.tcp_fin_timeout", "30", "45"),
    ("net.ipv4.tcp_keepalive_time", "600", "900"),
    ("net.ipv4.tcp_keepalive_intvl", "30", "40"),
    ("net.ipv4.tcp_keepalive_probes", "5", "6"),
    ("net.ipv4.tcp_syn_retries", "4", "5"),
    ("net.ipv4.tcp_synack_retries", "3", "4"),
    ("net.ipv4.tcp_max_syn_backlog", "4096", "8192"),
    ("net.ipv4.tcp_tw_reuse", "1", "0"),
    ("net.ipv4.tcp_max_tw_buckets", "200000", "300000"),
    ("net.ipv4.tcp_retries1", "4", "5"),
    ("net.ipv4.tcp_retries2", "8", "10"),
    ("net.ipv4.tcp_orphan_retries", "2", "3"),
    ("net.ipv4.tcp_mtu_probing", "1", "2"),
    ("net.ipv4.tcp_base_mss", "1100", "1200"),
    ("net.ipv4.tcp_notsent_lowat", "131072", "262144"),
    ("net.ipv4.ip_default_ttl", "63", "62"),
    ("net.ipv4.tcp_reordering", "4", "5"),
    ("net.ipv4.tcp_slow_start_after_idle", "0", "0"),
    ("net.ipv4.tcp_no_metrics_save", "1", "1"),
];
/// Held by a second profile all along, so the agent pod stays while the churned one comes
/// and goes (the agent is then restarted in place, never replaced).
const ANCHOR: (&str, &str) = ("net.ipv4.tcp_probe_interval", "500");

/// The churn run's state: the seeded kill points and what the kills hit.
struct Churn {
    seed: u64,
    rng: fastrand::Rng,
    node: String,
    originals: BTreeMap<String, String>,
    kills: usize,
    mid_pass: usize,
}

impl Churn {
    /// `NODETUNE_FAULT_SEED` when set (to replay a run), else the clock.
    fn seeded(node: &str, before: &BTreeMap<String, String>) -> Self {
        let seed = std::env::var("NODETUNE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or_default()
            });
        eprintln!("kill points seeded with NODETUNE_FAULT_SEED={seed}");
        let originals = CHURN
            .iter()
            .map(|(k, _, _)| (k.to_string(), before[*k].clone()))
            .collect();
        Churn {
            seed,
            rng: fastrand::Rng::with_seed(seed),
            node: node.to_string(),
            originals,
            kills: 0,
            mid_pass: 0,
        }
    }

    /// What the churned keys should hold after `phase` of iteration `i`.
    fn target(&self, i: usize, phase: &str) -> BTreeMap<String, String> {
        let set = |which: usize| -> BTreeMap<String, String> {
            CHURN
                .iter()
                .map(|(k, a, b)| (k.to_string(), if which == 0 { *a } else { *b }.to_string()))
                .collect()
        };
        match phase {
            "create" => set(i % 2),
            "edit" => set((i + 1) % 2),
            _ => self.originals.clone(),
        }
    }
}

fn churn_keys() -> Vec<&'static str> {
    CHURN.iter().map(|(k, _, _)| *k).collect()
}

/// An agent SIGKILLed at random moments while it applies, re-applies and restores: after its
/// restarts and the profiles' deletion, every key holds the value it had before nodetune.
/// The kill points come from a seeded generator; `NODETUNE_FAULT_SEED` replays a run (the seed
/// is printed, and named in failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn agent_sigkilled_while_applying_and_restoring() -> Result<()> {
    let Some(env) = setup("agent_sigkilled_while_applying_and_restoring", 1).await? else {
        return Ok(());
    };
    let node = "node-1";
    let all_keys: Vec<&str> = churn_keys().into_iter().chain([ANCHOR.0]).collect();
    let before = env.sysctls(node, &all_keys).await?;
    for (k, a, b) in CHURN {
        assert!(
            before[*k] != *a && before[*k] != *b,
            "{k}: pick values other than the default {}",
            before[*k]
        );
    }
    let g = env.apply(&web("anchor", &[ANCHOR])).await?;
    env.wait_sysctls(node, &map(&[ANCHOR])).await?;
    env.wait_profile("anchor", "Ready", |p| ready_at(p, g))
        .await?;
    let mut churn = Churn::seeded(node, &before);
    for i in 0..4 {
        // Create with one set, edit to the other, delete; a kill at a random moment after each.
        for phase in ["create", "edit", "delete"] {
            killed_during_a_change_the_agent_reaches_the_target(&env, &mut churn, i, phase).await?;
        }
    }
    eprintln!(
        "{} kills, {} with the node between old and new values",
        churn.kills, churn.mid_pass
    );
    the_last_profile_gone_every_key_is_as_before(&env, &churn, &before, &all_keys).await
}

/// One phase of the churn: the change made, the agent killed during it (or after), then the
/// restarted agent brings the node to the phase's target.
async fn killed_during_a_change_the_agent_reaches_the_target(
    env: &Env,
    c: &mut Churn,
    i: usize,
    phase: &str,
) -> Result<()> {
    let (seed, node) = (c.seed, c.node.clone());
    let target = c.target(i, phase);
    let agent = wait_agent_running(env, &node, 1).await?;
    let starts = agent.starts;
    let pid = agent
        .pid
        .and_then(|p| i32::try_from(p).ok())
        .context("pid")?;
    let at_start = env.sysctls(&node, &churn_keys()).await?;
    let to_change = target.iter().filter(|(k, v)| at_start[*k] != **v).count();
    let how = change_and_kill(env, c, phase, &target, &at_start, pid).await?;
    c.kills += 1;
    // Where the kill landed: how many keys already held the target.
    let at_kill = env.sysctls(&node, &churn_keys()).await?;
    let done = target
        .iter()
        .filter(|(k, v)| at_start[*k] != **v && at_kill[*k] == **v)
        .count();
    if done > 0 && done < to_change {
        c.mid_pass += 1;
    }
    eprintln!("iteration {i} {phase}: SIGKILL {how}, {done} of {to_change} changes made");
    wait_agent_running(env, &node, starts + 1)
        .await
        .with_context(|| format!("seed {seed}"))?;
    if phase == "delete" {
        env.wait_profile_gone("churn")
            .await
            .with_context(|| format!("seed {seed}"))?;
    }
    let mut want = target;
    want.insert(ANCHOR.0.into(), ANCHOR.1.into());
    env.wait_sysctls(&node, &want)
        .await
        .with_context(|| format!("seed {seed}, iteration {i} {phase}"))
}

/// Makes the phase's change and SIGKILLs the agent: two kills in three land a random few ms
/// into the agent's pass (watched from inside the node's namespace), the others at a random
/// moment after the change. Says where the kill landed.
async fn change_and_kill(
    env: &Env,
    c: &mut Churn,
    phase: &str,
    target: &BTreeMap<String, String>,
    at_start: &BTreeMap<String, String>,
    pid: i32,
) -> Result<String> {
    let node = env.node(&c.node).clone();
    let offset = Duration::from_micros(c.rng.u64(0..=8_000));
    let watcher = (c.rng.u8(0..3) != 0).then(|| {
        faults::sigkill_after_change(
            &node.netns,
            at_start.clone(),
            pid,
            offset,
            Duration::from_secs(20),
        )
    });
    match phase {
        "delete" => env.delete_profile("churn").await?,
        _ => {
            let values: Vec<(&str, &str)> = target
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            env.apply(&web("churn", &values)).await?;
        }
    }
    let Some(watcher) = watcher else {
        let delay = Duration::from_millis(c.rng.u64(0..=1000));
        tokio::time::sleep(delay).await;
        faults::sigkill_container(&env.cluster, |r| is_agent(r, &node.name))
            .map_err(|e| env.fail(e))?;
        return Ok(format!("{delay:?} after the change"));
    };
    let out = tokio::task::spawn_blocking(move || watcher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the kill watcher panicked"))??;
    ensure!(
        out.change_seen,
        "seed {}: the agent changed nothing in 20 s",
        c.seed
    );
    Ok(format!(
        "{offset:?} after its first write ({:?} after the change)",
        out.waited
    ))
}

/// The agent's ledger holds only the anchor's original; once the anchor goes too, every key
/// is as before nodetune and nothing panicked.
async fn the_last_profile_gone_every_key_is_as_before(
    env: &Env,
    c: &Churn,
    before: &BTreeMap<String, String>,
    all_keys: &[&str],
) -> Result<()> {
    let seed = c.seed;
    env.wait("only the anchor's original held", || async {
        let r = env.reports().get(&c.node).await?;
        let held = r.status.map(|s| s.held_originals).unwrap_or_default();
        if held == [ANCHOR.0] {
            return Ok(Some(()));
        }
        bail!("held originals {held:?}")
    })
    .await
    .with_context(|| format!("seed {seed}"))?;
    env.delete_profile("anchor").await?;
    env.wait_profile_gone("anchor").await?;
    env.wait_sysctls(&c.node, before)
        .await
        .with_context(|| format!("seed {seed}"))?;
    assert_eq!(
        env.sysctls(&c.node, all_keys).await?,
        *before,
        "seed {seed}"
    );
    let panics = faults::panics(&env.cluster);
    assert!(panics.is_empty(), "panics: {panics:#?}");
    Ok(())
}

/// A deleted node's report is garbage-collected through its owner reference, and the profile's
/// counts and node list drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn deleted_node_report_is_collected() -> Result<()> {
    let Some(env) = setup("deleted_node_report_is_collected", 2).await? else {
        return Ok(());
    };
    let g = env.apply(&web("gc", &[(FIN, "29")])).await?;
    env.wait_profile("gc", "Ready on 2 nodes", |p| {
        ready_at(p, g) && counts(p) == (2, 2, 0)
    })
    .await?;
    let node2 = Api::<Node>::all(env.cluster.client()).get("node-2").await?;
    let report = env.reports().get("node-2").await?;
    let owner = report
        .owner_references()
        .iter()
        .find(|o| o.kind == "Node")
        .context("the report has a Node owner")?;
    assert_eq!(Some(&owner.uid), node2.metadata.uid.as_ref());

    env.cluster.remove_node("node-2").await?;
    env.wait("node-2's report collected", || async {
        Ok(env
            .reports()
            .get_opt("node-2")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let p = env
        .wait_profile("gc", "counts without node-2", |p| {
            ready_at(p, g) && counts(p) == (1, 1, 0)
        })
        .await?;
    let listed: Vec<String> = p
        .status
        .map(|s| s.nodes.into_iter().map(|n| n.name).collect())
        .unwrap_or_default();
    assert!(!listed.iter().any(|n| n == "node-2"), "{listed:?}");
    assert!(env.reports().get_opt("node-1").await?.is_some());
    Ok(())
}

/// What the leader test measures before the kill, to compare after the takeover.
struct BeforeKill {
    leader: Pod,
    standby: Pod,
    transitions: i32,
    standby_ip: String,
    errors: f64,
}

/// The leading controller killed (its node's processes SIGKILLed, so the Lease is never handed
/// back) right after an edit that rolls out to more nodes: the standby takes the Lease within
/// its duration, finishes the rollout, and nothing fights over the objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn leader_killed_during_rollout() -> Result<()> {
    let Some(env) = setup("leader_killed_during_rollout", 3).await? else {
        return Ok(());
    };
    // First on node-1 only (its own label), then on every web node.
    env.cluster
        .label_node("node-1", &[("tier", Some("first"))])
        .await?;
    let first = profile("rollout").selecting("tier", "first");
    let g1 = env.apply(&first.sysctls(&[(FIN, "28")]).build()).await?;
    env.wait_profile("rollout", "Ready on node-1", |p| {
        ready_at(p, g1) && counts(p) == (1, 1, 0)
    })
    .await?;
    let before = a_leader_and_a_running_standby_on_two_nodes(&env).await?;
    // The rollout: every web node, a changed value. The leader dies while it is under way.
    let g2 = env.apply(&web("rollout", &[(FIN, "27")])).await?;
    let killed = kill_the_leader_mid_rollout(&env, &before, g2).await?;
    the_standby_takes_the_lease_within_its_duration(&env, &before, killed).await?;
    the_new_leader_finishes_the_rollout(&env, g2).await?;
    one_takeover_and_no_error_storm(&env, &before).await
}

/// Both replicas up, on different nodes, one leading; the figures to compare with later.
async fn a_leader_and_a_running_standby_on_two_nodes(env: &Env) -> Result<BeforeKill> {
    let (leader, standby) = env
        .wait("a leader and a running standby", || async {
            let pods = controller_pods(env).await?;
            let running: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            let Some(h) = holder(&lease(env).await?) else {
                return Ok(None);
            };
            let leader = running.iter().find(|p| p.name_any() == h);
            let standby = running.iter().find(|p| p.name_any() != h);
            Ok(leader
                .zip(standby)
                .map(|(l, s)| ((*l).clone(), (*s).clone())))
        })
        .await?;
    assert_ne!(node_of(&leader), node_of(&standby));
    let standby_ip = env
        .cluster
        .node(&node_of(&standby))
        .context("standby's node")?
        .ip;
    let errors = metric_sum(
        &http_get(&format!("{standby_ip}:8080"), "/metrics").await?,
        "nodetune_controller_errors_total",
    );
    Ok(BeforeKill {
        leader,
        standby,
        transitions: transitions(&lease(env).await?),
        standby_ip,
        errors,
    })
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Kills the leader's node once it has taken up `generation` and before the new nodes have
/// reported; returns when.
async fn kill_the_leader_mid_rollout(
    env: &Env,
    b: &BeforeKill,
    generation: i64,
) -> Result<Instant> {
    let seen = support::wait_for(
        "the leader rolling out the edit",
        WAIT,
        Duration::from_millis(50),
        || async {
            let p = env.profiles().get("rollout").await?;
            let s = p.status.clone().unwrap_or_default();
            let rolling = s.observed_generation == Some(generation)
                && is_true(&s.conditions, Type::Reconciling)
                && s.applied_nodes < 3;
            Ok(rolling.then_some(s))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    let leader_node = node_of(&b.leader);
    env.cluster.with_shim(|s| s.unregister_node(&leader_node));
    let killed = Instant::now();
    eprintln!(
        "killed leader {} on {leader_node} with the rollout at matched/applied {}/{}",
        b.leader.name_any(),
        seen.matched_nodes,
        seen.applied_nodes
    );
    Ok(killed)
}

async fn the_standby_takes_the_lease_within_its_duration(
    env: &Env,
    b: &BeforeKill,
    killed: Instant,
) -> Result<()> {
    let standby = b.standby.name_any();
    let took = support::wait_for("the standby holds the Lease", LEASE * 3, POLL, || async {
        let l = lease(env).await?;
        Ok((holder(&l).as_deref() == Some(standby.as_str())).then_some(killed.elapsed()))
    })
    .await
    .map_err(|e| env.fail(e))?;
    eprintln!("standby took over {took:?} after the kill");
    // Within the lease duration after the last renewal, plus polling and a loaded machine.
    assert!(
        took <= LEASE + Duration::from_secs(10),
        "took over after {took:?}"
    );
    Ok(())
}

async fn the_new_leader_finishes_the_rollout(env: &Env, generation: i64) -> Result<()> {
    wait_workers_hold(env, &map(&[(FIN, "27")])).await?;
    let what = "Ready on all 3 nodes under the new leader";
    env.wait_profile("rollout", what, |p| {
        ready_at(p, generation) && counts(p) == (3, 3, 0)
    })
    .await?;
    wait_reports_at(env, "rollout", generation, Timestamp::from_second(0)?).await?;
    for n in workers(env) {
        let node = Api::<Node>::all(env.cluster.client()).get(&n.name).await?;
        assert!(
            node.labels().contains_key(AGENT_NODE_LABEL),
            "{} has the agent label",
            n.name
        );
    }
    Ok(())
}

/// One takeover, no flapping; the DaemonSet was not rewritten differently by the new leader;
/// no error storm in the new leader's metrics nor in Warning Events.
async fn one_takeover_and_no_error_storm(env: &Env, b: &BeforeKill) -> Result<()> {
    let lease = lease(env).await?;
    assert_eq!(holder(&lease), Some(b.standby.name_any()));
    assert_eq!(transitions(&lease), b.transitions + 1, "{lease:?}");
    let ds = env.in_ns::<DaemonSet>().get(DAEMONSET_NAME).await?;
    assert_eq!(
        ds.metadata.generation,
        Some(1),
        "the DaemonSet never changed"
    );
    let metrics = http_get(&format!("{}:8080", b.standby_ip), "/metrics").await?;
    assert!(
        metrics.contains("nodetune_controller_is_leader 1"),
        "{metrics}"
    );
    let errors = metric_sum(&metrics, "nodetune_controller_errors_total") - b.errors;
    assert!(
        errors <= 3.0,
        "{errors} errors after the takeover:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("nodetune_controller_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let warnings: Vec<String> = Api::<Event>::all(env.cluster.client())
        .list(&ListParams::default().fields("type=Warning"))
        .await?
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("rollout"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.message))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let panics = faults::panics(&env.cluster);
    assert!(panics.is_empty(), "panics: {panics:#?}");
    Ok(())
}

/// A profile edited 50 times in quick succession: every node ends on the last generation with
/// the last value, and the status says Ready for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn fifty_quick_edits_end_on_the_last_generation() -> Result<()> {
    let Some(env) = setup("fifty_quick_edits_end_on_the_last_generation", 2).await? else {
        return Ok(());
    };
    let g0 = env.apply(&web("burst", &[(FIN, "20")])).await?;
    env.wait_profile("burst", "Ready", |p| {
        ready_at(p, g0) && counts(p) == (2, 2, 0)
    })
    .await?;
    let since = Timestamp::now();
    let mut last = g0;
    for i in 1..=50 {
        last = env
            .apply(&web("burst", &[(FIN, &(20 + i).to_string())]))
            .await?;
    }
    assert_eq!(last, g0 + 50, "every edit is a new generation");
    wait_workers_hold(&env, &map(&[(FIN, "70")])).await?;
    wait_reports_at(&env, "burst", last, since).await?;
    env.wait_profile("burst", "Ready at the last generation", |p| {
        ready_at(p, last) && counts(p) == (2, 2, 0)
    })
    .await?;
    for n in workers(&env) {
        let r = env.reports().get(&n.name).await?;
        let entry = r
            .status
            .as_ref()
            .and_then(|s| s.sysctls.iter().find(|e| e.key == FIN))
            .cloned()
            .context("fin_timeout in the report")?;
        assert_eq!(
            (
                entry.state,
                entry.desired.as_deref(),
                entry.actual.as_deref()
            ),
            (KeyState::Applied, Some("70"), Some("70")),
            "{}",
            n.name
        );
    }
    Ok(())
}

/// A node's ledger damaged under a running agent: after the agent restarts (SIGKILL) it sets the
/// damaged file aside and neither overwrites it nor writes the kernel: the node keeps its value,
/// the report is Stalled (`LedgerUnusable`, naming the set-aside file), the profile is Stalled,
/// and the agent keeps serving metrics (no crash loop). Once a person has renamed the set-aside
/// copy, the agent tunes again and the profile is Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn corrupt_ledger_stops_writes_and_is_reported() -> Result<()> {
    let Some(env) = setup("corrupt_ledger_stops_writes_and_is_reported", 1).await? else {
        return Ok(());
    };
    let g = env.apply(&web("lg", &[(FIN, "31")])).await?;
    env.wait_profile("lg", "Ready on 1 node", |p| {
        ready_at(p, g) && counts(p) == (1, 1, 0)
    })
    .await?;
    env.wait_sysctls("node-1", &map(&[(FIN, "31")])).await?;
    let state_dir = env.node("node-1").root.join("var/lib/nodetune");
    let ledger = state_dir.join("ledger.json");
    ensure!(
        ledger.exists(),
        "the agent keeps its ledger at {}",
        ledger.display()
    );
    // Truncated, as a full disk or a crashed editor would leave it; then the agent restarts.
    std::fs::write(&ledger, "{\"version\": 1, \"entries\": [")?;
    let before = wait_agent_running(&env, "node-1", 1).await?;
    faults::sigkill_container(&env.cluster, |r| is_agent(r, "node-1"))?;
    wait_agent_running(&env, "node-1", before.starts + 1).await?;
    let g2 = env.apply(&web("lg", &[(FIN, "33")])).await?;
    let copy = a_damaged_ledger_is_set_aside_and_reported_stalled(&env, &state_dir).await?;
    the_stalled_agent_writes_nothing_and_keeps_serving(&env, before.starts + 1).await?;
    // A person checked the copy (its originals go back by hand if needed) and renamed it.
    std::fs::rename(&copy, state_dir.join("ledger-checked.json"))?;
    env.wait_sysctls("node-1", &map(&[(FIN, "33")])).await?;
    env.wait_profile("lg", "Ready again", |p| ready_at(p, g2))
        .await?;
    Ok(())
}

/// The report is Stalled/LedgerUnusable naming the one set-aside copy, which keeps the damaged
/// bytes; the profile is Stalled, not Ready. Returns the copy's path.
async fn a_damaged_ledger_is_set_aside_and_reported_stalled(
    env: &Env,
    state_dir: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let report = env
        .wait_report("node-1", "Stalled/LedgerUnusable", |s| {
            find(&s.conditions, Type::Stalled)
                .is_some_and(|c| c.status == "True" && c.reason == "LedgerUnusable")
        })
        .await?;
    let message = find(&report.conditions, Type::Stalled)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.contains("ledger.json.corrupt-"),
        "the report names the set-aside file: {message}"
    );
    let copies: Vec<_> = std::fs::read_dir(state_dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ledger.json.corrupt-")
        })
        .map(|e| e.path())
        .collect();
    ensure!(copies.len() == 1, "one set-aside copy: {copies:?}");
    ensure!(
        std::fs::read_to_string(&copies[0])?.starts_with("{\"version\": 1, \"entries\": ["),
        "the damaged bytes are kept as they were"
    );
    env.wait_profile("lg", "Stalled while the ledger is unusable", |p| {
        p.status.as_ref().is_some_and(|s| {
            is_true(&s.conditions, Type::Stalled) && !is_true(&s.conditions, Type::Ready)
        })
    })
    .await?;
    Ok(copies[0].clone())
}

/// Nothing written, and the agent is alive and serving metrics all along (no crash loop).
async fn the_stalled_agent_writes_nothing_and_keeps_serving(env: &Env, starts: u32) -> Result<()> {
    assert_eq!(env.sysctls("node-1", &[FIN]).await?[FIN], "31");
    let addr = format!("{}:9477", env.node("node-1").ip);
    let metrics = http_get(&addr, "/metrics").await?;
    ensure!(metrics.contains("nodetune_agent_passes_total"), "{metrics}");
    let rec = wait_agent_running(env, "node-1", starts).await?;
    ensure!(rec.starts == starts, "no crash loop: {} starts", rec.starts);
    Ok(())
}
