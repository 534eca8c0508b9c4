//! Faults, end to end on a real control plane with real agents (issue 10): the apiserver and
//! etcd going away, agents SIGKILLed while they apply and restore, a node deleted, the leading
//! controller killed during a rollout, and a burst of edits.
//!
//! Layout of every cluster: two "infra" nodes that run only the two controller replicas (one
//! each, so killing a leader's node kills nothing else) and a few "web" nodes that profiles
//! select, where the agents run. Only network-namespace keys (`net.ipv4.*`) are tuned: the
//! simulated nodes share this machine's kernel for everything else.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Affinity, EnvVar, Event, Node, Pod, PodAntiAffinity};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport};
use nodetune::conditions::{Type, find, is_true};
use support::shim::{ProcRecord, ShimConfig};
use support::{Cluster, SimNode, faults, http_get, wait_for};

const NS: &str = "nodetune-system";
const ROLE: &str = "node.example.com/role";
const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
/// Generous: the machine is small and shared; a step normally takes a few seconds.
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(250);
/// The controller's Lease duration (src/controller/leader.rs).
const LEASE: Duration = Duration::from_secs(15);

/// A cluster with `workers` web nodes (`node-1`, ...), two infra nodes (`ctl-1`, `ctl-2`) for
/// the controllers, the shim, the CRDs and nodetune deployed from deploy/.
struct Env {
    cluster: Cluster,
    workers: Vec<SimNode>,
}

async fn setup(test: &str, workers: usize) -> Result<Option<Env>> {
    let Some(bin) = support::cluster_prereqs(test) else {
        return Ok(None);
    };
    let cluster = Cluster::start(&bin).await?;
    for name in ["ctl-1", "ctl-2"] {
        cluster.add_node(name, &[(ROLE, "infra")]).await?;
    }
    let mut nodes = Vec::new();
    for i in 1..=workers {
        nodes.push(
            cluster
                .add_node(&format!("node-{i}"), &[(ROLE, "web")])
                .await?,
        );
    }
    // Restarts after a SIGKILL come quickly, so a test can kill many times.
    let mut cfg = ShimConfig::new(
        env!("CARGO_BIN_EXE_nodetune").into(),
        cluster.node_server().to_string(),
        cluster.ca_file(),
        cluster.dir().join("pods"),
    );
    cfg.backoff_base = Duration::from_millis(250);
    cfg.backoff_cap = Duration::from_secs(1);
    cluster.start_shim_with(cfg)?;

    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    // The shipped Deployment (two replicas), with short intervals, pinned to the infra nodes,
    // one replica per node (each binds the metrics port of its node).
    let pod = deploy
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
    let container = pod.containers.first_mut().context("a container")?;
    let env = container.env.get_or_insert_with(Vec::new);
    for (k, v) in [
        ("NODETUNE_AGENT_INTERVAL", "2s"),
        ("NODETUNE_AGENT_HEARTBEAT", "4s"),
        ("NODETUNE_DEBOUNCE", "200ms"),
        ("NODETUNE_FINALIZER_TIMEOUT", "120s"),
    ] {
        env.push(EnvVar {
            name: k.into(),
            value: Some(v.into()),
            ..Default::default()
        });
    }
    Api::<Deployment>::namespaced(cluster.client(), NS)
        .create(&PostParams::default(), &deploy)
        .await?;
    Ok(Some(Env {
        cluster,
        workers: nodes,
    }))
}

/// A profile selecting nodes with `role`, restoring on removal.
fn profile(name: &str, role: &str, priority: i32, sysctls: &[(&str, &str)]) -> NodeTuningProfile {
    NodeTuningProfile::new(
        name,
        NodeTuningProfileSpec {
            node_selector: Some(LabelSelector {
                match_labels: Some([(ROLE.to_string(), role.to_string())].into()),
                ..Default::default()
            }),
            sysctls: sysctls
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            priority,
            restore_on_removal: true,
            ..Default::default()
        },
    )
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Ready=True for `generation`, both on the status and on the Ready condition.
fn ready_at(p: &NodeTuningProfile, generation: i64) -> bool {
    let Some(s) = p.status.as_ref() else {
        return false;
    };
    s.observed_generation == Some(generation)
        && is_true(&s.conditions, Type::Ready)
        && find(&s.conditions, Type::Ready).and_then(|c| c.observed_generation) == Some(generation)
}

fn counts(p: &NodeTuningProfile) -> (i32, i32, i32) {
    p.status
        .as_ref()
        .map(|s| (s.matched_nodes, s.applied_nodes, s.failed_nodes))
        .unwrap_or_default()
}

/// The generation of `profile` the report says the node applied.
fn report_generation(r: &NodeTuningReport, profile: &str) -> Option<i64> {
    r.status
        .as_ref()?
        .profiles
        .iter()
        .find(|p| p.name == profile)
        .map(|p| p.generation)
}

fn is_agent(r: &ProcRecord, node: &str) -> bool {
    r.namespace == NS && r.node == node && r.pod.starts_with("nodetune-agent")
}

impl Env {
    fn profiles(&self) -> Api<NodeTuningProfile> {
        Api::all(self.cluster.client())
    }

    fn reports(&self) -> Api<NodeTuningReport> {
        Api::all(self.cluster.client())
    }

    fn worker(&self, i: usize) -> &SimNode {
        &self.workers[i - 1]
    }

    /// Server-side applies a profile; returns its new generation.
    async fn apply(&self, p: &NodeTuningProfile) -> Result<i64> {
        let p = self
            .profiles()
            .patch(
                &p.name_any(),
                &PatchParams::apply("e2e-faults").force(),
                &Patch::Apply(p),
            )
            .await?;
        p.metadata.generation.context("generation")
    }

    async fn delete_profile(&self, name: &str) -> Result<()> {
        self.profiles()
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    async fn wait_profile_gone(&self, name: &str) -> Result<()> {
        wait_for(
            &format!("profile {name} gone (finalizer released)"),
            WAIT,
            POLL,
            || async { Ok(self.profiles().get_opt(name).await?.is_none().then_some(())) },
        )
        .await
        .map_err(|e| self.fail(e))
    }

    /// Values of `keys` in the node's namespace (whitespace normalised), in one `sysctl` call.
    async fn sysctls<S: AsRef<str>>(
        &self,
        node: &SimNode,
        keys: &[S],
    ) -> Result<BTreeMap<String, String>> {
        let mut cmd = vec!["sysctl".to_string()];
        cmd.extend(keys.iter().map(|k| k.as_ref().to_string()));
        let out = node.exec_ok(&cmd).await?;
        let mut values = BTreeMap::new();
        for line in out.lines() {
            let (k, v) = line
                .split_once(" = ")
                .with_context(|| format!("sysctl output line {line:?}"))?;
            values.insert(
                k.trim().to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            );
        }
        ensure!(values.len() == keys.len(), "sysctl printed {values:?}");
        Ok(values)
    }

    async fn set_sysctl(&self, node: &SimNode, key: &str, value: &str) -> Result<()> {
        node.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")])
            .await?;
        Ok(())
    }

    /// Waits until the node's namespace holds every value of `want`.
    async fn wait_sysctls(&self, node: &SimNode, want: &BTreeMap<String, String>) -> Result<()> {
        self.wait_sysctls_for(node, want, WAIT).await
    }

    async fn wait_sysctls_for(
        &self,
        node: &SimNode,
        want: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<()> {
        let keys: Vec<&String> = want.keys().collect();
        wait_for(
            &format!("{} to hold {want:?}", node.name),
            timeout,
            POLL,
            || async {
                let have = self.sysctls(node, &keys).await?;
                if have == *want {
                    return Ok(Some(()));
                }
                bail!("holds {have:?}")
            },
        )
        .await
        .map_err(|e| self.fail(e))
    }

    async fn wait_profile<F>(&self, name: &str, what: &str, check: F) -> Result<NodeTuningProfile>
    where
        F: Fn(&NodeTuningProfile) -> bool,
    {
        wait_for(&format!("profile {name}: {what}"), WAIT, POLL, || async {
            let p = self.profiles().get(name).await?;
            if check(&p) {
                return Ok(Some(p));
            }
            bail!("status {:?}", p.status)
        })
        .await
        .map_err(|e| self.fail(e))
    }

    /// Waits for every worker's report to show `profile` at `generation`, written after `since`.
    async fn wait_reports_at(
        &self,
        profile: &str,
        generation: i64,
        since: Timestamp,
    ) -> Result<()> {
        for node in &self.workers {
            wait_for(
                &format!(
                    "{}'s report at {profile} generation {generation}",
                    node.name
                ),
                WAIT,
                POLL,
                || async {
                    let r = self.reports().get(&node.name).await?;
                    let fresh = r
                        .status
                        .as_ref()
                        .and_then(|s| s.last_report_time.as_ref())
                        .is_some_and(|t| t.0 > since);
                    let all_applied = r.status.as_ref().is_some_and(|s| {
                        !s.sysctls.is_empty()
                            && s.sysctls.iter().all(|e| e.state == KeyState::Applied)
                    });
                    Ok(
                        (fresh
                            && all_applied
                            && report_generation(&r, profile) == Some(generation))
                        .then_some(()),
                    )
                },
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    /// The running agent process on a node (as the shim runs it).
    async fn wait_agent_running(&self, node: &str, min_starts: u32) -> Result<ProcRecord> {
        wait_for(
            &format!("agent on {node} running (start #{min_starts} or later)"),
            WAIT,
            Duration::from_millis(50),
            || async {
                Ok(faults::running_record(&self.cluster, |r| {
                    is_agent(r, node) && r.starts >= min_starts
                }))
            },
        )
        .await
        .map_err(|e| self.fail(e))
    }

    async fn controller_pods(&self) -> Result<Vec<Pod>> {
        Ok(Api::<Pod>::namespaced(self.cluster.client(), NS)
            .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
            .await?
            .items)
    }

    async fn lease(&self) -> Result<Lease> {
        Ok(Api::<Lease>::namespaced(self.cluster.client(), NS)
            .get("nodetune-controller")
            .await?)
    }

    /// Adds the cluster's logs to a failure, so CI output explains it.
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("diagnostics:\n{}", self.cluster.diagnostics()))
    }
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

/// kube-apiserver stopped for 30 s, then etcd restarted: agents keep their nodes tuned and
/// correct drift while the API is away, reconnect (they act on edits made afterwards), reports
/// and status converge; nothing panics and nothing restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn apiserver_outage_and_etcd_restart() -> Result<()> {
    let Some(env) = setup("apiserver_outage_and_etcd_restart", 2).await? else {
        return Ok(());
    };
    let fin = "net.ipv4.tcp_fin_timeout";
    let keepalive = "net.ipv4.tcp_keepalive_time";
    let g1 = env
        .apply(&profile(
            "outage",
            "web",
            0,
            &[(fin, "31"), (keepalive, "601")],
        ))
        .await?;
    let want = map(&[(fin, "31"), (keepalive, "601")]);
    for n in &env.workers {
        env.wait_sysctls(n, &want).await?;
    }
    env.wait_profile("outage", "Ready, applied on 2", |p| {
        ready_at(p, g1) && counts(p) == (2, 2, 0)
    })
    .await?;
    let mut drift_before = BTreeMap::new();
    for n in &env.workers {
        let r = env.reports().get(&n.name).await?;
        drift_before.insert(
            n.name.clone(),
            r.status.map(|s| s.drift_corrections).unwrap_or(0),
        );
    }

    // The apiserver goes away for 30 s.
    let outage = Duration::from_secs(30);
    let apiserver =
        faults::stop_component(&env.cluster, "kube-apiserver", Duration::from_secs(10)).await?;
    let stopped_at = Instant::now();
    let during = async {
        ensure!(
            env.profiles().get("outage").await.is_err(),
            "the API still answers with kube-apiserver stopped"
        );
        // Drift on every node is corrected with no API to talk to.
        for n in &env.workers {
            env.set_sysctl(n, fin, "77").await?;
        }
        for n in &env.workers {
            env.wait_sysctls_for(n, &want, Duration::from_secs(20))
                .await?;
        }
        ensure!(
            !faults::alive(faults::component_pid(&env.cluster, "kube-apiserver")?),
            "the drift must be corrected while the API is down"
        );
        // Agents keep serving their metrics meanwhile.
        let metrics = http_get(&format!("{}:9477", env.worker(1).ip), "/metrics").await?;
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

    // Reports catch up: fresh, drift corrections counted, the same generation applied.
    env.wait_reports_at("outage", g1, back).await?;
    for n in &env.workers {
        let r = env.reports().get(&n.name).await?;
        let corrections = r.status.map(|s| s.drift_corrections).unwrap_or(0);
        assert!(
            corrections > drift_before[&n.name],
            "{}: drift corrections {corrections}, before the outage {}",
            n.name,
            drift_before[&n.name]
        );
    }
    // Reconnected: an edit made now reaches the kernels and the status.
    let g2 = env
        .apply(&profile(
            "outage",
            "web",
            0,
            &[(fin, "32"), (keepalive, "601")],
        ))
        .await?;
    let want = map(&[(fin, "32"), (keepalive, "601")]);
    for n in &env.workers {
        env.wait_sysctls(n, &want).await?;
    }
    env.wait_profile("outage", "Ready at the edit after the outage", |p| {
        ready_at(p, g2) && counts(p) == (2, 2, 0)
    })
    .await?;

    // etcd restarted under the apiserver.
    let etcd = faults::stop_component(&env.cluster, "etcd", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.start()?;
    faults::wait_apiserver_ready(&env.cluster, WAIT)
        .await
        .map_err(|e| env.fail(e))?;
    let back = Timestamp::now();
    let g3 = env
        .apply(&profile(
            "outage",
            "web",
            0,
            &[(fin, "33"), (keepalive, "602")],
        ))
        .await?;
    let want = map(&[(fin, "33"), (keepalive, "602")]);
    for n in &env.workers {
        env.wait_sysctls(n, &want).await?;
    }
    env.wait_reports_at("outage", g3, back).await?;
    env.wait_profile("outage", "Ready after the etcd restart", |p| {
        ready_at(p, g3) && counts(p) == (2, 2, 0)
    })
    .await?;

    // No panic anywhere, no process restarted, the rest of the control plane still up.
    let panics = faults::panics(&env.cluster);
    assert!(panics.is_empty(), "panics: {panics:#?}");
    let records = env.cluster.with_shim(|s| s.records());
    let agents = records
        .iter()
        .filter(|r| r.pod.starts_with("nodetune-agent"))
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
    let mut rng = fastrand::Rng::with_seed(seed);
    let node = env.worker(1).clone();
    let all_keys: Vec<&str> = CHURN.iter().map(|(k, _, _)| *k).chain([ANCHOR.0]).collect();
    let before = env.sysctls(&node, &all_keys).await?;
    for (k, a, b) in CHURN {
        assert!(
            before[*k] != *a && before[*k] != *b,
            "{k}: pick values other than the default {}",
            before[*k]
        );
    }

    let g = env.apply(&profile("anchor", "web", 0, &[ANCHOR])).await?;
    env.wait_sysctls(&node, &map(&[ANCHOR])).await?;
    env.wait_profile("anchor", "Ready", |p| ready_at(p, g))
        .await?;

    let set = |which: usize| -> Vec<(&str, &str)> {
        CHURN
            .iter()
            .map(|(k, a, b)| (*k, if which == 0 { *a } else { *b }))
            .collect()
    };
    let originals: BTreeMap<String, String> = CHURN
        .iter()
        .map(|(k, _, _)| (k.to_string(), before[*k].clone()))
        .collect();
    let churn_keys: Vec<&str> = CHURN.iter().map(|(k, _, _)| *k).collect();
    let mut mid_pass = 0;
    let mut kills = 0;
    let iterations = 4;
    for i in 0..iterations {
        // Create with one set, edit to the other, delete; a kill at a random moment after each.
        for phase in ["create", "edit", "delete"] {
            let target: BTreeMap<String, String> = match phase {
                "create" => map(&set(i % 2)),
                "edit" => map(&set((i + 1) % 2)),
                _ => originals.clone(),
            };
            let agent = env.wait_agent_running(&node.name, 1).await?;
            let starts = agent.starts;
            let pid = agent
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .context("pid")?;
            let at_start = env.sysctls(&node, &churn_keys).await?;
            let to_change = target.iter().filter(|(k, v)| at_start[*k] != **v).count();
            // Two kills in three land a random few ms into the agent's pass (watched from
            // inside the node's namespace), the others at a random moment after the change.
            let offset = Duration::from_micros(rng.u64(0..=8_000));
            let watcher = (rng.u8(0..3) != 0).then(|| {
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
                    env.apply(&profile("churn", "web", 0, &values)).await?;
                }
            }
            let how = if let Some(watcher) = watcher {
                let out = tokio::task::spawn_blocking(move || watcher.join())
                    .await?
                    .map_err(|_| anyhow::anyhow!("the kill watcher panicked"))??;
                ensure!(
                    out.change_seen,
                    "seed {seed}: the agent changed nothing in 20 s"
                );
                format!(
                    "{offset:?} after its first write ({:?} after the change)",
                    out.waited
                )
            } else {
                let delay = Duration::from_millis(rng.u64(0..=1000));
                tokio::time::sleep(delay).await;
                faults::sigkill_container(&env.cluster, |r| is_agent(r, &node.name))
                    .map_err(|e| env.fail(e))?;
                format!("{delay:?} after the change")
            };
            kills += 1;
            // Where the kill landed: how many keys already held the target.
            let at_kill = env.sysctls(&node, &churn_keys).await?;
            let done = target
                .iter()
                .filter(|(k, v)| at_start[*k] != **v && at_kill[*k] == **v)
                .count();
            if done > 0 && done < to_change {
                mid_pass += 1;
            }
            eprintln!("iteration {i} {phase}: SIGKILL {how}, {done} of {to_change} changes made");
            env.wait_agent_running(&node.name, starts + 1)
                .await
                .with_context(|| format!("seed {seed}"))?;
            if phase == "delete" {
                env.wait_profile_gone("churn")
                    .await
                    .with_context(|| format!("seed {seed}"))?;
            }
            let mut want = target.clone();
            want.insert(ANCHOR.0.into(), ANCHOR.1.into());
            env.wait_sysctls(&node, &want)
                .await
                .with_context(|| format!("seed {seed}, iteration {i} {phase}"))?;
        }
    }
    eprintln!("{kills} kills, {mid_pass} with the node between old and new values");

    // The agent's ledger holds only the anchor's original now.
    wait_for("only the anchor's original held", WAIT, POLL, || async {
        let r = env.reports().get(&node.name).await?;
        let held = r.status.map(|s| s.held_originals).unwrap_or_default();
        if held == [ANCHOR.0] {
            return Ok(Some(()));
        }
        bail!("held originals {held:?}")
    })
    .await
    .map_err(|e| env.fail(e))
    .with_context(|| format!("seed {seed}"))?;

    // Last profile gone: every key as before nodetune.
    env.delete_profile("anchor").await?;
    env.wait_profile_gone("anchor").await?;
    env.wait_sysctls(&node, &before)
        .await
        .with_context(|| format!("seed {seed}"))?;
    assert_eq!(env.sysctls(&node, &all_keys).await?, before, "seed {seed}");
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
    let g = env
        .apply(&profile(
            "gc",
            "web",
            0,
            &[("net.ipv4.tcp_fin_timeout", "29")],
        ))
        .await?;
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
    wait_for("node-2's report collected", WAIT, POLL, || async {
        Ok(env
            .reports()
            .get_opt("node-2")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .map_err(|e| env.fail(e))?;
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

/// The leading controller killed (its node's processes SIGKILLed, so the Lease is never handed
/// back) right after an edit that rolls out to more nodes: the standby takes the Lease within
/// its duration, finishes the rollout, and nothing fights over the objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn leader_killed_during_rollout() -> Result<()> {
    let Some(env) = setup("leader_killed_during_rollout", 3).await? else {
        return Ok(());
    };
    let fin = "net.ipv4.tcp_fin_timeout";
    // First on node-1 only (its own label), then on every web node.
    env.cluster
        .label_node("node-1", &[("tier", Some("first"))])
        .await?;
    let mut p = profile("rollout", "web", 0, &[(fin, "28")]);
    p.spec.node_selector = Some(LabelSelector {
        match_labels: Some([("tier".to_string(), "first".to_string())].into()),
        ..Default::default()
    });
    let g1 = env.apply(&p).await?;
    env.wait_profile("rollout", "Ready on node-1", |p| {
        ready_at(p, g1) && counts(p) == (1, 1, 0)
    })
    .await?;

    // Both replicas up, one leading.
    let (leader, standby) = wait_for("a leader and a running standby", WAIT, POLL, || async {
        let pods = env.controller_pods().await?;
        let running: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        let Some(h) = holder(&env.lease().await?) else {
            return Ok(None);
        };
        let leader = running.iter().find(|p| p.name_any() == h);
        let standby = running.iter().find(|p| p.name_any() != h);
        Ok(leader
            .zip(standby)
            .map(|(l, s)| ((*l).clone(), (*s).clone())))
    })
    .await
    .map_err(|e| env.fail(e))?;
    let node_of = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let (leader_node, standby_node) = (node_of(&leader), node_of(&standby));
    assert_ne!(leader_node, standby_node);
    let transitions_before = transitions(&env.lease().await?);
    let standby_ip = env
        .cluster
        .node(&standby_node)
        .context("standby's node")?
        .ip;
    let errors_before = metric_sum(
        &http_get(&format!("{standby_ip}:8080"), "/metrics").await?,
        "nodetune_controller_errors_total",
    );

    // The rollout: every web node, a changed value. The leader dies while it is under way.
    let g2 = env
        .apply(&profile("rollout", "web", 0, &[(fin, "27")]))
        .await?;
    // Killed once it has taken up the new generation and before the new nodes have reported.
    let seen = wait_for(
        "the leader rolling out the edit",
        WAIT,
        Duration::from_millis(50),
        || async {
            let p = env.profiles().get("rollout").await?;
            let s = p.status.clone().unwrap_or_default();
            let rolling = s.observed_generation == Some(g2)
                && is_true(&s.conditions, Type::Reconciling)
                && s.applied_nodes < 3;
            Ok(rolling.then_some(s))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    env.cluster.with_shim(|s| s.unregister_node(&leader_node));
    let killed = Instant::now();
    eprintln!(
        "killed leader {} on {leader_node} with the rollout at matched/applied {}/{}",
        leader.name_any(),
        seen.matched_nodes,
        seen.applied_nodes
    );

    let took =
        wait_for("the standby holds the Lease", LEASE * 3, POLL, || async {
            let l = env.lease().await?;
            Ok((holder(&l).as_deref() == Some(standby.name_any().as_str()))
                .then_some(killed.elapsed()))
        })
        .await
        .map_err(|e| env.fail(e))?;
    eprintln!("standby took over {took:?} after the kill");
    // Within the lease duration after the last renewal, plus polling and a loaded machine.
    assert!(
        took <= LEASE + Duration::from_secs(10),
        "took over after {took:?}"
    );

    for n in &env.workers {
        env.wait_sysctls(n, &map(&[(fin, "27")])).await?;
    }
    env.wait_profile(
        "rollout",
        "Ready on all 3 nodes under the new leader",
        |p| ready_at(p, g2) && counts(p) == (3, 3, 0),
    )
    .await?;
    env.wait_reports_at("rollout", g2, Timestamp::from_second(0)?)
        .await?;
    for n in &env.workers {
        let node = Api::<Node>::all(env.cluster.client()).get(&n.name).await?;
        assert!(
            node.labels().contains_key("nodetune.dev/agent"),
            "{} has the agent label",
            n.name
        );
    }

    // One takeover, no flapping; the DaemonSet was not rewritten differently by the new leader;
    // no error storm in the new leader's metrics nor in Warning Events.
    let lease = env.lease().await?;
    assert_eq!(holder(&lease), Some(standby.name_any()));
    assert_eq!(transitions(&lease), transitions_before + 1, "{lease:?}");
    let ds = Api::<DaemonSet>::namespaced(env.cluster.client(), NS)
        .get("nodetune-agent")
        .await?;
    assert_eq!(
        ds.metadata.generation,
        Some(1),
        "the DaemonSet never changed"
    );
    let metrics = http_get(&format!("{standby_ip}:8080"), "/metrics").await?;
    assert!(
        metrics.contains("nodetune_controller_is_leader 1"),
        "{metrics}"
    );
    let errors = metric_sum(&metrics, "nodetune_controller_errors_total") - errors_before;
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
    let fin = "net.ipv4.tcp_fin_timeout";
    let g0 = env
        .apply(&profile("burst", "web", 0, &[(fin, "20")]))
        .await?;
    env.wait_profile("burst", "Ready", |p| {
        ready_at(p, g0) && counts(p) == (2, 2, 0)
    })
    .await?;
    let since = Timestamp::now();
    let mut last = g0;
    for i in 1..=50 {
        last = env
            .apply(&profile("burst", "web", 0, &[(fin, &(20 + i).to_string())]))
            .await?;
    }
    assert_eq!(last, g0 + 50, "every edit is a new generation");
    for n in &env.workers {
        env.wait_sysctls(n, &map(&[(fin, "70")])).await?;
    }
    env.wait_reports_at("burst", last, since).await?;
    env.wait_profile("burst", "Ready at the last generation", |p| {
        ready_at(p, last) && counts(p) == (2, 2, 0)
    })
    .await?;
    for n in &env.workers {
        let r = env.reports().get(&n.name).await?;
        let entry = r
            .status
            .as_ref()
            .and_then(|s| s.sysctls.iter().find(|e| e.key == fin))
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
    const KEY: &str = "net.ipv4.tcp_fin_timeout";
    let g = env.apply(&profile("lg", "web", 0, &[(KEY, "31")])).await?;
    env.wait_profile("lg", "Ready on 1 node", |p| {
        ready_at(p, g) && counts(p) == (1, 1, 0)
    })
    .await?;
    let node = env.worker(1);
    env.wait_sysctls(node, &map(&[(KEY, "31")])).await?;
    let state_dir = node.root.join("var/lib/nodetune");
    let ledger = state_dir.join("ledger.json");
    ensure!(
        ledger.exists(),
        "the agent keeps its ledger at {}",
        ledger.display()
    );

    // Truncated, as a full disk or a crashed editor would leave it; then the agent restarts.
    std::fs::write(&ledger, "{\"version\": 1, \"entries\": [")?;
    let before = env.wait_agent_running("node-1", 1).await?;
    faults::sigkill_container(&env.cluster, |r| is_agent(r, "node-1"))?;
    env.wait_agent_running("node-1", before.starts + 1).await?;
    let g2 = env.apply(&profile("lg", "web", 0, &[(KEY, "33")])).await?;

    let report = wait_for(
        "node-1's report Stalled/LedgerUnusable",
        WAIT,
        POLL,
        || async {
            let r = env.reports().get("node-1").await?;
            let stalled = r
                .status
                .as_ref()
                .and_then(|s| find(&s.conditions, Type::Stalled).cloned());
            Ok(stalled.filter(|c| c.status == "True" && c.reason == "LedgerUnusable"))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    ensure!(
        report.message.contains("ledger.json.corrupt-"),
        "the report names the set-aside file: {}",
        report.message
    );
    let copies: Vec<_> = std::fs::read_dir(&state_dir)?
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
    // Nothing written, and the agent is alive and serving metrics all along.
    assert_eq!(env.sysctls(node, &[KEY]).await?[KEY], "31");
    let metrics = http_get(&format!("{}:9477", node.ip), "/metrics").await?;
    ensure!(metrics.contains("nodetune_agent_passes_total"), "{metrics}");
    let rec = env.wait_agent_running("node-1", before.starts + 1).await?;
    ensure!(
        rec.starts == before.starts + 1,
        "no crash loop: {} starts",
        rec.starts
    );

    // A person checked the copy (its originals go back by hand if needed) and renamed it.
    std::fs::rename(&copies[0], state_dir.join("ledger-checked.json"))?;
    env.wait_sysctls(node, &map(&[(KEY, "33")])).await?;
    env.wait_profile("lg", "Ready again", |p| ready_at(p, g2))
        .await?;
    Ok(())
}
