//! Control-plane smoke tests: a real etcd + kube-apiserver + kube-controller-manager +
//! kube-scheduler (built by tests/cluster/build), simulated nodes as network namespaces and
//! the node shim playing the kubelet. Needs root and the built binaries, so the tests are
//! `#[ignore]`d (counted as skipped by a plain `cargo test`) and run with `--ignored`; then a
//! missing prerequisite prints a SKIPPED banner, or fails when NODETUNE_REQUIRE_CLUSTER is set.
//!
//! Run: cargo test --test cluster_smoke -- --ignored --nocapture

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use support::cluster::process_netns_inode;
use support::{Cluster, cluster_prereqs, wait_for};

const NS: &str = "nodetune-smoke";
const APP: &str = "nodetune-agent";
const TIER: &str = "nodetune.test/tier";
const POLL: Duration = Duration::from_millis(250);

fn versions() -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(support::repo_root().join("tests/cluster/versions.env"))
        .expect("read tests/cluster/versions.env");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Runs a command, returning stdout; an error with stderr when it fails.
async fn run(mut cmd: tokio::process::Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn daemonset() -> DaemonSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": APP, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {
                    "serviceAccountName": APP,
                    "nodeSelector": {TIER: "edge"},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "agent",
                        "image": "ghcr.io/nodetune/nodetune:0.1.0",
                        "command": ["/usr/local/bin/nodetune"],
                        "args": ["tcpstat", "--watch", "5"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "NODETUNE_STATE_DIR", "value": "/var/lib/nodetune"},
                        ],
                        "volumeMounts": [{"name": "state", "mountPath": "/var/lib/nodetune"}],
                    }],
                    "volumes": [{"name": "state",
                                 "hostPath": {"path": "/var/lib/nodetune", "type": "DirectoryOrCreate"}}],
                }
            }
        }
    }))
    .expect("valid DaemonSet")
}

/// One agent as observed: pod, node, pid of its process.
#[derive(Debug, Clone)]
struct Agent {
    pod: String,
    node: String,
    pid: u32,
    restarts: i32,
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Exactly one agent pod per node of `nodes` and none elsewhere (terminating ones count),
/// each Running and Ready, its process alive inside that node's namespace.
async fn agents_on(cluster: &Cluster, nodes: &[&str]) -> anyhow::Result<Option<Vec<Agent>>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let list = pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?;
    let placed: BTreeSet<String> = list
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let want: BTreeSet<String> = nodes.iter().map(|s| s.to_string()).collect();
    if list.items.len() != nodes.len() || placed != want {
        bail!(
            "{} pods on {placed:?} (terminating: {}), want one on each of {want:?}",
            list.items.len(),
            list.items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_some())
                .count()
        );
    }
    let agent_bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut agents = Vec::new();
    for p in &list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase != "Running" || !is_ready(p) {
            bail!(
                "pod {name} on {node}: phase {phase:?}, ready {}",
                is_ready(p)
            );
        }
        let rec = cluster
            .with_shim(|s| s.pod_records(NS, &name))
            .into_iter()
            .next()
            .with_context(|| format!("shim has no record of {name}"))?;
        let pid = match (rec.running, rec.pid) {
            (true, Some(pid)) => pid,
            _ => bail!("process of {name} not running: {rec:?}"),
        };
        let sim = cluster
            .node(&node)
            .with_context(|| format!("unknown node {node}"))?;
        ensure!(
            process_netns_inode(pid)? == sim.netns_inode()?,
            "process {pid} of {name} is not in netns {}",
            sim.netns
        );
        // A concurrent `cargo build` may replace the binary: then the link says "(deleted)".
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        let exe = exe.to_string_lossy();
        ensure!(
            exe.trim_end_matches(" (deleted)") == agent_bin.to_string_lossy(),
            "process {pid} runs {exe}, not the agent"
        );
        let restarts = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .map_or(0, |c| c.restart_count);
        agents.push(Agent {
            pod: name,
            node,
            pid,
            restarts,
        });
    }
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Some(agents))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn daemonset_agents_run_in_node_namespaces_and_follow_labels() {
    let Some(bin) = cluster_prereqs("daemonset_agents_run_in_node_namespaces_and_follow_labels")
    else {
        return;
    };
    let t0 = Instant::now();
    let cluster = Cluster::start(&bin).await.expect("control plane starts");
    eprintln!(
        "control plane up in {:?} ({})",
        cluster.startup_time(),
        cluster.dir().display()
    );
    if let Err(e) = smoke(&cluster).await {
        panic!("{e:#}");
    }
    eprintln!(
        "smoke test body done; total with startup {:?}",
        t0.elapsed()
    );
}

async fn smoke(cluster: &Cluster) -> anyhow::Result<()> {
    let client = cluster.client();
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    for (name, tier) in [("node-a", "edge"), ("node-b", "edge"), ("node-c", "core")] {
        cluster.add_node(name, &[(TIER, tier)]).await?;
    }

    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": APP}}))?,
        )
        .await?;
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    dss.create(&PostParams::default(), &daemonset()).await?;

    // 1. Two edge nodes: exactly two agents, each in its node's namespace.
    let t = Instant::now();
    let agents = wait_for(
        "agents on node-a and node-b",
        Duration::from_secs(120),
        POLL,
        || agents_on(cluster, &["node-a", "node-b"]),
    )
    .await?;
    eprintln!("2 agents running in {:?}: {agents:?}", t.elapsed());

    // The shim resolved the downward API and mapped the hostPath mount to the node's root.
    let rec = cluster
        .with_shim(|s| s.pod_records(NS, &agents[0].pod))
        .into_iter()
        .next()
        .context("record")?;
    let env = |k: &str| rec.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    ensure!(
        env("NODE_NAME").as_deref() == Some("node-a"),
        "NODE_NAME: {:?}",
        rec.env
    );
    let sim_a = cluster.node("node-a").context("node-a")?;
    let state_dir = sim_a.root.join("var/lib/nodetune");
    ensure!(
        env("NODETUNE_STATE_DIR") == Some(state_dir.display().to_string()) && state_dir.is_dir(),
        "NODETUNE_STATE_DIR: {:?}",
        rec.env
    );
    ensure!(
        rec.args == ["tcpstat", "--watch", "5"],
        "args: {:?}",
        rec.args
    );

    // From inside node-a's namespace, the pod's kubeconfig reaches the apiserver over the
    // bridge, verifies its certificate and authenticates as the pod's ServiceAccount, with
    // the node name in the token (what a ValidatingAdmissionPolicy can check).
    let kubeconfig = rec.kubeconfig.clone().context("no per-pod kubeconfig")?;
    let whoami = sim_a
        .exec_ok(&[
            cluster.bin("kubectl").as_os_str(),
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
            "auth".as_ref(),
            "whoami".as_ref(),
            "-o".as_ref(),
            "json".as_ref(),
        ])
        .await?;
    let whoami: serde_json::Value = serde_json::from_str(&whoami)?;
    let user = &whoami["status"]["userInfo"];
    ensure!(
        user["username"] == format!("system:serviceaccount:{NS}:{APP}"),
        "whoami: {whoami}"
    );
    ensure!(
        user["extra"]["authentication.kubernetes.io/node-name"][0] == "node-a",
        "no node-name in token: {whoami}"
    );

    // The final behaviour of `tcpstat --watch 5`: it keeps running and reports again after
    // an interval (its output grows) without being restarted.
    let first = &agents[0];
    let log_len = || {
        let log = cluster.with_shim(|s| s.pod_log(NS, &first.pod));
        log.lines().filter(|l| !l.starts_with("[shim ")).count()
    };
    let t = Instant::now();
    let mut seen = 0;
    wait_for(
        "tcpstat --watch to report twice without a restart",
        Duration::from_secs(30),
        POLL,
        || {
            let now_len = log_len();
            let grew = seen > 0 && now_len > seen;
            if seen == 0 {
                seen = now_len;
            }
            async move {
                let agents = agents_on(cluster, &["node-a", "node-b"])
                    .await?
                    .unwrap_or_default();
                let a = agents
                    .iter()
                    .find(|a| a.pod == first.pod)
                    .context("agent gone")?;
                ensure!(
                    a.pid == first.pid && a.restarts == 0,
                    "agent restarted: {a:?}, was {first:?}"
                );
                Ok(grew.then_some(()))
            }
        },
    )
    .await?;
    eprintln!("agent reported twice in {:?}", t.elapsed());

    // 2. Relabel: node-b leaves the selector, node-c joins; the DaemonSet follows.
    let t = Instant::now();
    cluster
        .label_node("node-b", &[(TIER, Some("core"))])
        .await?;
    cluster
        .label_node("node-c", &[(TIER, Some("edge"))])
        .await?;
    let moved = wait_for(
        "agents on node-a and node-c",
        Duration::from_secs(120),
        POLL,
        || agents_on(cluster, &["node-a", "node-c"]),
    )
    .await?;
    let old_b = &agents[1];
    ensure!(
        moved[0].pod == agents[0].pod && moved[0].pid == agents[0].pid,
        "agent on node-a was replaced: {moved:?} vs {agents:?}"
    );
    let b_rec = cluster
        .with_shim(|s| s.pod_records(NS, &old_b.pod))
        .into_iter()
        .next()
        .context("record of node-b's agent")?;
    ensure!(!b_rec.running, "node-b's agent still running: {b_rec:?}");
    ensure!(
        !Path::new(&format!("/proc/{}", old_b.pid)).exists(),
        "pid {} of node-b's agent still exists",
        old_b.pid
    );
    eprintln!("DaemonSet followed the relabel in {:?}", t.elapsed());

    // 3. Delete the DaemonSet: its pods are garbage-collected and the processes stop.
    let t = Instant::now();
    dss.delete(APP, &DeleteParams::background()).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait_for(
        "agent pods garbage-collected",
        Duration::from_secs(120),
        POLL,
        || async {
            let left = pods
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await?
                .items
                .len();
            let running: Vec<_> = cluster
                .with_shim(|s| s.records())
                .into_iter()
                .filter(|r| r.namespace == NS && r.running)
                .collect();
            if left > 0 || !running.is_empty() {
                bail!("{left} pods left, {} processes running", running.len());
            }
            Ok(Some(()))
        },
    )
    .await?;
    eprintln!("pods garbage-collected in {:?}", t.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn kubectl_and_helm_work_against_the_cluster() {
    let Some(bin) = cluster_prereqs("kubectl_and_helm_work_against_the_cluster") else {
        return;
    };
    let cluster = Cluster::start(&bin).await.expect("control plane starts");
    eprintln!("control plane up in {:?}", cluster.startup_time());
    if let Err(e) = tools(&cluster).await {
        panic!("{e:#}");
    }
}

async fn tools(cluster: &Cluster) -> anyhow::Result<()> {
    let v = versions();
    for name in ["node-a", "node-b", "node-c"] {
        cluster.add_node(name, &[]).await?;
    }

    let mut cmd = cluster.kubectl();
    cmd.args(["get", "nodes", "-o", "name"]);
    let nodes = run(cmd, "kubectl get nodes").await?;
    let nodes: Vec<&str> = nodes.lines().collect();
    ensure!(
        nodes == ["node/node-a", "node/node-b", "node/node-c"],
        "kubectl get nodes: {nodes:?}"
    );

    let mut cmd = cluster.kubectl();
    cmd.args(["version", "-o", "json"]);
    let version: serde_json::Value = serde_json::from_str(&run(cmd, "kubectl version").await?)?;
    for side in ["clientVersion", "serverVersion"] {
        ensure!(
            version[side]["gitVersion"] == v["K8S_VERSION"].as_str(),
            "{side}: {version}"
        );
    }

    let mut cmd = cluster.helm();
    cmd.args(["version", "--short"]);
    let helm_version = run(cmd, "helm version").await?;
    ensure!(
        helm_version.starts_with(&v["HELM_VERSION"]),
        "helm version: {helm_version}"
    );

    // A tiny chart whose kubeVersion constraint needs a real server version.
    let chart = tempfile::tempdir()?;
    std::fs::create_dir(chart.path().join("templates"))?;
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\nkubeVersion: \">= 1.30.0-0\"\n",
    )?;
    std::fs::write(
        chart.path().join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n\
         data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )?;
    let mut cmd = cluster.helm();
    cmd.args(["install", "smoke"]).arg(chart.path()).args([
        "--namespace",
        "default",
        "--wait",
        "--timeout",
        "60s",
    ]);
    run(cmd, "helm install").await?;

    let mut cmd = cluster.helm();
    cmd.args(["list", "-A", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&run(cmd, "helm list").await?)?;
    ensure!(
        list.as_array().is_some_and(|l| l
            .iter()
            .any(|r| r["name"] == "smoke" && r["status"] == "deployed")),
        "helm list: {list}"
    );
    let mut cmd = cluster.kubectl();
    cmd.args([
        "get",
        "configmap",
        "smoke-cm",
        "-o",
        "jsonpath={.data.kubeVersion}",
    ]);
    let rendered = run(cmd, "kubectl get configmap").await?;
    ensure!(
        rendered == v["K8S_VERSION"],
        "rendered kubeVersion {rendered}"
    );

    let mut cmd = cluster.helm();
    cmd.args(["uninstall", "smoke", "--namespace", "default", "--wait"]);
    run(cmd, "helm uninstall").await?;

    // Removing a simulated node removes both halves: the Node object and the namespace.
    let netns = cluster.node("node-c").context("node-c")?.netns;
    cluster.remove_node("node-c").await?;
    let mut cmd = cluster.kubectl();
    cmd.args(["get", "nodes", "-o", "name"]);
    let nodes = run(cmd, "kubectl get nodes").await?;
    ensure!(
        nodes.lines().collect::<Vec<_>>() == ["node/node-a", "node/node-b"],
        "after remove: {nodes}"
    );
    ensure!(
        !Path::new("/run/netns").join(&netns).exists(),
        "netns {netns} still exists"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn crashing_agent_is_restarted_with_backoff_and_reported() {
    let Some(bin) = cluster_prereqs("crashing_agent_is_restarted_with_backoff_and_reported") else {
        return;
    };
    let cluster = Cluster::start(&bin).await.expect("control plane starts");
    if let Err(e) = crash_loop(&cluster).await {
        panic!("{e:#}");
    }
}

async fn crash_loop(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    cluster.add_node("node-a", &[]).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crasher"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "agent",
                "image": "ghcr.io/nodetune/nodetune:0.1.0",
                "args": ["no-such-subcommand"],
            }],
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    // The binary rejects the argument and exits non-zero: the shim restarts it with a
    // growing delay and reports every round through pods/status, as the kubelet would.
    let t = Instant::now();
    wait_for(
        "two restarts reported",
        Duration::from_secs(60),
        POLL,
        || async {
            let p = pods.get("crasher").await?;
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .context("no container status yet")?;
            let exit = cs
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| t.exit_code);
            if cs.restart_count < 2 {
                bail!("restartCount {} (last exit {exit:?})", cs.restart_count);
            }
            ensure!(exit.is_some_and(|c| c != 0), "last exit {exit:?}");
            ensure!(
                !is_ready(&p) || cs.ready,
                "pod ready while container is not"
            );
            Ok(Some(()))
        },
    )
    .await?;
    let rec = cluster
        .with_shim(|s| s.pod_records("default", "crasher"))
        .into_iter()
        .next()
        .context("record")?;
    ensure!(rec.starts >= 3, "starts: {rec:?}");
    eprintln!("3 starts within {:?}", t.elapsed());

    // Deleting the pod stops the restarts and lets the pod go.
    pods.delete("crasher", &DeleteParams::default()).await?;
    wait_for("crasher deleted", Duration::from_secs(30), POLL, || async {
        Ok(pods.get_opt("crasher").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}
