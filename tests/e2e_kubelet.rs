//! The operator on real kubelet nodes: containerd + kubelet in node namespaces
//! (`tests/cluster/node add --kubelet`), the nodetune image imported into each node's
//! containerd (no registry), installed with `helm install` of charts/nodetune (the
//! controller renders the agent DaemonSet) and removed with `helm uninstall`, whose
//! pre-delete hook Job runs the image on a kubelet node. Checks what only a real kubelet can
//! get wrong: the pod spec's privileges, host namespaces and hostPath, probes, the image's
//! entrypoint and user, restarts by the kubelet, `kubectl logs`, a Job that completes.
//!
//! Profiles here hold network-namespace keys only: a kubelet node shares this machine's
//! kernel for vm.*, kernel.* and fs.*. The agent's hostPath state directory is this
//! machine's own path (one agent runs, on the selected node).
//!
//! Needs root, the control plane and the node components of tests/cluster/build; `#[ignore]`d
//! like every cluster test: `cargo test --test e2e_kubelet -- --ignored --nocapture`.
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReport};
use nodetune::names::{AGENT_NODE_LABEL as AGENT_LABEL, AGENT_POD_SELECTOR as AGENT_SELECTOR};
use support::cluster::{mounts_under, process_netns_inode};
use support::e2e::NS;
use support::fixtures::{ROLE, profile};
use support::kubelet::KubeletNode;
use support::pod_workload::{self, Load};
use support::sockets::{SocketLoad, nonzero, ss_counts};
use support::{Cluster, SimNode, kubectl, run, wait_for};

const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
/// On kubelet nodes only: the controller and the uninstall hook are pinned to them, since the
/// node shim plays the kubelet for long-running pods and never completes a Job.
const RUNTIME: &str = "nodetune.test/runtime";
/// Generous: image unpacking and the kubelet's sync loops on a small shared machine.
const WAIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(500);

const TW_REUSE: &str = "net.ipv4.tcp_tw_reuse";
const PORT_RANGE: &str = "net.ipv4.ip_local_port_range";

/// The host profile of the scenarios: two keys on the `web` nodes.
fn web_server() -> NodeTuningProfile {
    profile("web-server")
        .role("web")
        .priority(10)
        .sysctls(&[(TW_REUSE, "1"), (PORT_RANGE, "32768 65000")])
        .build()
}

/// A directory removed on drop unless it existed at creation.
struct RemoveIfNew(Option<std::path::PathBuf>);

impl RemoveIfNew {
    fn new(path: &str) -> Self {
        let p = std::path::PathBuf::from(path);
        Self((!p.exists()).then_some(p))
    }
}

impl Drop for RemoveIfNew {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

async fn apply(profiles: &Api<NodeTuningProfile>, p: &NodeTuningProfile) -> Result<()> {
    let name = p.metadata.name.as_deref().context("profile name")?;
    let params = PatchParams::apply("e2e-kubelet").force();
    profiles.patch(name, &params, &Patch::Apply(p)).await?;
    Ok(())
}

async fn sysctl(node: &SimNode, key: &str) -> Result<String> {
    let out = node.exec_ok(&["sysctl", "-n", key]).await?;
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

async fn pods(cluster: &Cluster, selector: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(cluster.client(), NS)
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map_or(0, |c| c.restart_count)
}

/// `helm install` of the chart with the demo policy (network-namespace keys only), short agent
/// intervals, two controller replicas on the kubelet nodes and the image under test, which
/// was imported into each node's containerd: pull policy Never, no registry is ever asked.
async fn helm_install(cluster: &Cluster, image: &str) -> Result<()> {
    let (repository, tag) = image.rsplit_once(':').context("image tag")?;
    let values = cluster.dir().join("kubelet-values.yaml");
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: '{tag}', pullPolicy: Never}}\n\
             controller:\n  replicas: 2\n  nodeSelector: {{{RUNTIME}: kubelet}}\n\
             agent: {{interval: 2s, heartbeat: 4s}}\n"
        ),
    )?;
    let values = values.to_str().context("values path")?;
    support::helm_install_demo(cluster, &["-f", values]).await?;
    Ok(())
}

/// Scenarios on kubelet nodes, the chart installed by helm: the controller pods (non-root,
/// read-only root, pod network) Ready through their probes; a profile applied on the selected
/// node only by an agent pod that really runs the image privileged in the node's namespace;
/// `kubectl logs`; the kubelet restarting a killed agent with nothing restored; the profile
/// deleted: originals back and the agent pod gone; applied again, then `helm uninstall`: its
/// hook Job completes on a kubelet node and the nodes are left clean; a node deleted leaves
/// nothing running or mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, the control plane and the kubelet-node components (tests/cluster/build); run with --ignored"]
async fn operator_image_on_kubelet_nodes() -> Result<()> {
    let test = "operator_image_on_kubelet_nodes";
    let Some((bin, _node_bin)) = support::kubelet_prereqs(test) else {
        return Ok(());
    };
    // The agent's hostPath state dir is this machine's: removed afterwards (also after a
    // failure) if this test made it.
    let _state_dir = RemoveIfNew::new(nodetune::sysctl::DEFAULT_STATE_DIR);
    let t0 = Instant::now();
    let cluster = Cluster::start(&bin).await?;
    // A panic (not an Err) so the cluster's drop prints its diagnostics and keeps its dir.
    if let Err(e) = scenario(&cluster).await {
        panic!("{test} failed after {:?}: {e:#}", t0.elapsed());
    }
    eprintln!("{test}: {:?} in total", t0.elapsed());
    Ok(())
}

async fn scenario(cluster: &Cluster) -> Result<()> {
    let t = Instant::now();
    let image_dir = cluster.dir().join("image");
    let image =
        support::kubelet::nodetune_image(env!("CARGO_BIN_EXE_nodetune").as_ref(), &image_dir)
            .await?;
    eprintln!("image {} built in {:?}", image.tag, t.elapsed());

    let a = cluster
        .add_kubelet_node("node-a", &[(ROLE, "web"), (RUNTIME, "kubelet")])
        .await?;
    let b = cluster
        .add_kubelet_node("node-b", &[(ROLE, "db"), (RUNTIME, "kubelet")])
        .await?;
    eprintln!(
        "node add -> Ready: node-a {:?}, node-b {:?}",
        a.ready_in, b.ready_in
    );
    for n in [&a, &b] {
        cluster.import_image(&n.name, &[&image.archive]).await?;
    }
    let originals_a = (sysctl(&a, TW_REUSE).await?, sysctl(&a, PORT_RANGE).await?);
    let originals_b = (sysctl(&b, TW_REUSE).await?, sysctl(&b, PORT_RANGE).await?);
    ensure!(
        originals_a.0 != "1" && originals_b.0 != "1",
        "fresh namespaces must start from the kernel default of {TW_REUSE}"
    );

    // The registered Nodes carry the labels asked for.
    let role = kubectl(
        cluster,
        &[
            "get",
            "node",
            "node-a",
            "-o",
            "jsonpath={.metadata.labels.node\\.example\\.com/role}",
        ],
    )
    .await?;
    ensure!(role == "web", "node-a role label: {role:?}");

    let t = Instant::now();
    helm_install(cluster, &image.tag).await?;
    // Controller pods: pod network, non-root, read-only root, Ready through their probes.
    let controllers = wait_for("two Ready controller pods", WAIT, POLL, || async {
        let ps = pods(cluster, CONTROLLER_SELECTOR).await?;
        Ok((ps.len() == 2 && ps.iter().all(is_ready)).then_some(ps))
    })
    .await?;
    eprintln!("controller pods Ready in {:?}", t.elapsed());
    for p in &controllers {
        let node = cluster
            .kubelet_node(&node_of(p))
            .context("controller pod on a kubelet node")?;
        let pid = node
            .container_pid(NS, &p.name_any(), "controller")
            .await?
            .context("controller container running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        ensure!(uid == "65532", "controller runs as uid {uid}, want 65532");
        ensure!(
            process_netns_inode(pid)? != node.netns_inode()?,
            "controller pod must have its own network namespace"
        );
        let write = node
            .exec(&["nsenter", "-t", &pid.to_string(), "-m", "touch", "/probe"])
            .await?;
        ensure!(
            !write.status.success(),
            "controller's root filesystem is writable"
        );
    }

    // A simulated node beside the kubelet nodes, its pods run by the node shim: both kinds
    // in one cluster, both selected by the profile.
    let c = cluster.add_node("node-c", &[(ROLE, "web")]).await?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;

    // Scenario 1: applied on the selected nodes only.
    let t = Instant::now();
    let p = web_server();
    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    apply(&profiles, &p).await?;
    wait_for("tcp_tw_reuse=1 on node-a", WAIT, POLL, || async {
        Ok((sysctl(&a, TW_REUSE).await? == "1").then_some(()))
    })
    .await?;
    ensure!(sysctl(&a, PORT_RANGE).await? == "32768 65000");
    wait_for("tcp_tw_reuse=1 on node-c (shim)", WAIT, POLL, || async {
        Ok((sysctl(&c, TW_REUSE).await? == "1").then_some(()))
    })
    .await?;
    wait_for("profile Ready=True", WAIT, POLL, || async {
        let p = profiles.get("web-server").await?;
        let ready = p.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;
    eprintln!("profile applied and Ready in {:?}", t.elapsed());
    ensure!(
        (sysctl(&b, TW_REUSE).await?, sysctl(&b, PORT_RANGE).await?) == originals_b,
        "node-b (not selected) was changed"
    );

    // Scenario 2: the agent pod is the image, privileged, in the node's namespace.
    let agent = wait_for(
        "Ready agent pods on node-a and node-c only",
        WAIT,
        POLL,
        || async {
            let ps = pods(cluster, AGENT_SELECTOR).await?;
            let mut on: Vec<String> = ps.iter().map(node_of).collect();
            on.sort();
            let a_pod = ps.iter().find(|p| node_of(p) == "node-a").cloned();
            Ok((on == ["node-a", "node-c"] && ps.iter().all(is_ready))
                .then_some(a_pod)
                .flatten())
        },
    )
    .await?;
    let agent_name = agent.name_any();
    let pid = a
        .container_pid(NS, &agent_name, "agent")
        .await?
        .context("agent container running")?;
    ensure!(
        process_netns_inode(pid)? == a.netns_inode()?,
        "agent must run in node-a's network namespace"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(
        cmdline.starts_with(b"/nodetune\0agent"),
        "agent process is the image's entrypoint: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    // kubectl logs through the apiserver -> kubelet path.
    let logs = kubectl(cluster, &["logs", "-n", NS, &agent_name]).await?;
    ensure!(
        !logs.trim().is_empty(),
        "kubectl logs of the agent is empty"
    );

    // Scenarios 6 and 7 (issue 18): a pod's own namespace counted and tuned.
    let tuned = pods_counted_and_tuned(cluster, &a, &image.tag).await?;

    // Scenario 4: sockets held in node-a's namespace show in its report as ss counts them
    // (the kubelet's and containerd's own connections included).
    let t = Instant::now();
    let _load = SocketLoad::start(&a, 7, 5).await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let counts = wait_for("node-a report equal to ss", WAIT, POLL, || async {
        let ss = ss_counts(&a).await?;
        let r = reports.get("node-a").await?;
        let total = r.status.map(|s| s.tcp.total).unwrap_or_default();
        let held = ss.get("TIME_WAIT").copied().unwrap_or(0) >= 5
            && ss.get("ESTABLISHED").copied().unwrap_or(0) >= 14;
        Ok((held && nonzero(&total) == ss).then_some(total))
    })
    .await?;
    eprintln!("report matched ss in {:?}: {counts:?}", t.elapsed());

    // Scenario 3: kill the agent's process; the kubelet restarts it, nothing is restored.
    let t = Instant::now();
    // SAFETY: kill(2) on a pid we just read; no memory is involved.
    let rc = unsafe { libc::kill(i32::try_from(pid)?, libc::SIGKILL) };
    ensure!(rc == 0, "kill agent pid {pid}");
    let restarted = wait_for(
        "agent restarted by the kubelet and Ready",
        WAIT,
        POLL,
        || async {
            let p = Api::<Pod>::namespaced(cluster.client(), NS)
                .get(&agent_name)
                .await?;
            Ok((restarts(&p) >= 1 && is_ready(&p)).then_some(p))
        },
    )
    .await?;
    eprintln!(
        "agent restarted (restartCount {}) and Ready in {:?}",
        restarts(&restarted),
        t.elapsed()
    );
    ensure!(sysctl(&a, TW_REUSE).await? == "1", "restart restored a key");
    let since = k8s_openapi::jiff::Timestamp::now();
    let report = wait_for("a report from the restarted agent", WAIT, POLL, || async {
        let s = reports.get("node-a").await?.status;
        let fresh = s
            .as_ref()
            .and_then(|s| s.last_report_time.as_ref())
            .is_some_and(|t| t.0 > since);
        Ok(s.filter(|_| fresh))
    })
    .await?;
    ensure!(
        report.sysctls.iter().all(|e| e.state != KeyState::Restored),
        "restarted agent restored: {:?}",
        report.sysctls
    );
    ensure!(
        [TW_REUSE, PORT_RANGE]
            .iter()
            .all(|k| report.held_originals.iter().any(|h| h == k)),
        "the ledger still holds the originals: {:?}",
        report.held_originals
    );

    // Scenario 8 (issue 18): the restarted agent left the pod alone; then pods come and go.
    pods_after_restart(cluster, &a, &image.tag, tuned).await?;

    // Memory of a kubelet node (kubelet, containerd, shims, containers).
    for n in [&a, &b] {
        let mem = n.memory_kib();
        let total: u64 = mem.values().sum();
        eprintln!(
            "memory of {}: {} MiB total, {mem:?} KiB",
            n.name,
            total / 1024
        );
    }

    // Scenario 5 (in part): delete the profile: originals back, agent pod gone.
    let t = Instant::now();
    profiles
        .delete("web-server", &DeleteParams::default())
        .await?;
    wait_for(
        "originals back on node-a and node-c",
        WAIT,
        POLL,
        || async {
            let now_a = (sysctl(&a, TW_REUSE).await?, sysctl(&a, PORT_RANGE).await?);
            let now_c = (sysctl(&c, TW_REUSE).await?, sysctl(&c, PORT_RANGE).await?);
            Ok((now_a == originals_a && now_c == originals_b).then_some(()))
        },
    )
    .await?;
    wait_for("agent pod removed", WAIT, POLL, || async {
        Ok(pods(cluster, AGENT_SELECTOR)
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    eprintln!(
        "profile deleted, originals back, agent gone in {:?}",
        t.elapsed()
    );

    // Scenario 5, uninstall: the profile applied again, then `helm uninstall`. Its pre-delete
    // hook (a Job running the image on a kubelet node) deletes the profile and waits for the
    // restores; then the controller goes and the agent DaemonSet with it.
    apply(&profiles, &p).await?;
    wait_for("tuned again on node-a and node-c", WAIT, POLL, || async {
        Ok(
            (sysctl(&a, TW_REUSE).await? == "1" && sysctl(&c, TW_REUSE).await? == "1")
                .then_some(()),
        )
    })
    .await?;
    let t = Instant::now();
    let uninstall = run(
        cluster
            .helm()
            .args(["uninstall", "nodetune", "--namespace", NS, "--wait"])
            .args(["--timeout", "4m"]),
        "helm uninstall",
    )
    .await;
    if let Err(e) = uninstall {
        let state = kubectl(cluster, &["get", "jobs,pods", "-n", NS, "-o", "wide"]).await;
        let logs = kubectl(
            cluster,
            &[
                "logs",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/component=uninstall",
            ],
        )
        .await;
        return Err(e.context(format!("{state:?}\nhook logs: {logs:?}")));
    }
    eprintln!("helm uninstall (hook Job included) in {:?}", t.elapsed());
    ensure!(
        (sysctl(&a, TW_REUSE).await?, sysctl(&a, PORT_RANGE).await?) == originals_a
            && (sysctl(&c, TW_REUSE).await?, sysctl(&c, PORT_RANGE).await?) == originals_b,
        "originals back on every selected node after helm uninstall"
    );
    ensure!(
        profiles
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            && reports.list(&ListParams::default()).await?.items.is_empty(),
        "no profile or report left after helm uninstall"
    );
    wait_for("no pods left in the namespace", WAIT, POLL, || async {
        let left = Api::<Pod>::namespaced(cluster.client(), NS)
            .list(&ListParams::default())
            .await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await?;
    let labelled = Api::<Node>::all(cluster.client())
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await?;
    ensure!(
        labelled.items.is_empty(),
        "nodes keep the {AGENT_LABEL} label: {:?}",
        labelled.iter().map(|n| n.name_any()).collect::<Vec<_>>()
    );

    // A deleted kubelet node leaves nothing running, mounted or in cgroups.
    let node_dir = cluster.dir().join("nodes/node-b");
    cluster.remove_node("node-b").await?;
    ensure!(
        mounts_under(&node_dir).is_empty(),
        "mounts left: {:?}",
        mounts_under(&node_dir)
    );
    ensure!(!node_dir.exists(), "node dir left");
    ensure!(
        !std::path::Path::new("/run/netns").join(&b.netns).exists(),
        "namespace left"
    );
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")?
        .flatten()
        .map(|h| h.path().join(&b.cgroup))
        .filter(|p| p.exists())
        .collect();
    ensure!(left.is_empty(), "cgroups left: {left:?}");
    Ok(())
}

/// The pod profile of the scenarios: three keys in the `squid-e2e` pods on the `web` nodes.
fn squid_pods() -> NodeTuningProfile {
    profile("squid-pods")
        .role("web")
        .pods("app", "squid-e2e")
        .sysctls(&[
            ("net.ipv4.tcp_fin_timeout", "17"),
            (PORT_RANGE, "20000 40000"),
            (TW_REUSE, "1"),
        ])
        .build()
}
const POD_KEYS: [&str; 3] = ["net.ipv4.tcp_fin_timeout", PORT_RANGE, TW_REUSE];
const POD_WANTED: [&str; 3] = ["17", "20000 40000", "1"];
/// 80 ESTABLISHED, 15 CLOSE_WAIT, and 20 TIME_WAIT a second for 15 s: about 300 TIME_WAIT
/// that then hold still until the first expires, 60 s after it was made.
const SQUID_LOAD: Load = Load {
    established: 40,
    close_wait: 15,
    churn_rate: 20,
    churn_seconds: 15,
};
const QUIET_LOAD: Load = Load {
    established: 2,
    close_wait: 0,
    churn_rate: 0,
    churn_seconds: 0,
};

/// What the pod scenarios before the agent restart leave for the ones after it.
struct PodsTuned {
    squid: (u32, String),
    squid_defaults: Vec<String>,
    squid_entries: Vec<serde_json::Value>,
    other: (u32, Vec<String>),
}

fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Scenario 6: the report's top pods list the workload pod with the counts `ss` gives in its
/// namespace (the churn stopped first, so they hold still), and the node's own counts stay
/// what `ss` gives in the node's namespace. Scenario 7: a podSelector profile sets its keys in
/// the selected pod only (nsenter), not in an unselected pod nor the node's namespace.
async fn pods_counted_and_tuned(
    cluster: &Cluster,
    a: &KubeletNode,
    image: &str,
) -> Result<PodsTuned> {
    let t = Instant::now();
    let spec = pod_workload::workload_pod("squid-e2e-0", "squid-e2e", "node-a", image, SQUID_LOAD)?;
    let (squid_pid, squid) = pod_workload::start(cluster, a, &spec).await?;
    let spec = pod_workload::workload_pod("other-e2e", "other-e2e", "node-a", image, QUIET_LOAD)?;
    let (other_pid, _) = pod_workload::start(cluster, a, &spec).await?;
    let squid_defaults = pod_workload::sysctls(squid_pid, &POD_KEYS).await?;
    let other_defaults = pod_workload::sysctls(other_pid, &POD_KEYS).await?;
    let host_before = (sysctl(a, TW_REUSE).await?, sysctl(a, PORT_RANGE).await?);
    eprintln!("workload pods running in {:?}", t.elapsed());

    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let matched = wait_for(
        "the pod's report counts equal to ss in its namespace",
        WAIT,
        POLL,
        || async {
            let ss = pod_workload::ss_counts(squid_pid).await?;
            let status = reports.get("node-a").await?.status;
            let top = status
                .as_ref()
                .and_then(|s| s.pods.as_ref())
                .and_then(|p| p.top.iter().find(|t| t.name == "squid-e2e-0"))
                .map(|t| (nonzero(&t.states), t.time_wait));
            let churned = ss.get("TIME_WAIT").copied().unwrap_or(0) >= 200;
            // sockstat's `tw` (the cheap tier's TIME_WAIT) also counts the orphaned FIN_WAIT2
            // sockets the kernel keeps as timewait sockets: ss and the walk show those apart.
            let tw_ss = ss.get("TIME_WAIT").copied().unwrap_or(0)
                + ss.get("FIN_WAIT2").copied().unwrap_or(0);
            Ok(top.filter(|(states, tw)| churned && *states == ss && *tw == tw_ss))
        },
    )
    .await?;
    eprintln!("pod counts matched ss in {:?}: {matched:?}", t.elapsed());
    ensure!(matched.0.get("ESTABLISHED") == Some(&80) && matched.0.get("CLOSE_WAIT") == Some(&15));
    wait_for(
        "node-a's own counts equal to ss in its namespace",
        WAIT,
        POLL,
        || async {
            let ss = ss_counts(a).await?;
            let total = reports
                .get("node-a")
                .await?
                .status
                .map(|s| s.tcp.total)
                .unwrap_or_default();
            Ok((nonzero(&total) == ss).then_some(()))
        },
    )
    .await?;

    let t = Instant::now();
    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    apply(&profiles, &squid_pods()).await?;
    wait_for(
        "the pod profile's keys in the selected pod",
        WAIT,
        POLL,
        || async {
            Ok((pod_workload::sysctls(squid_pid, &POD_KEYS).await? == POD_WANTED).then_some(()))
        },
    )
    .await?;
    eprintln!("pod profile applied inside the pod in {:?}", t.elapsed());
    ensure!(
        pod_workload::sysctls(other_pid, &POD_KEYS).await? == other_defaults,
        "unselected pod changed"
    );
    ensure!(
        (sysctl(a, TW_REUSE).await?, sysctl(a, PORT_RANGE).await?) == host_before,
        "node-a's own namespace changed"
    );
    let squid_uid = uid_of(&squid);
    let squid_entries = wait_for("podSysctls in the report", WAIT, POLL, || async {
        let status = reports.get("node-a").await?.status.unwrap_or_default();
        let applied = status
            .pod_sysctls
            .iter()
            .filter(|e| e.profile == "squid-pods")
            .all(|e| e.applied == 1 && e.failed == 0);
        let n = status
            .pod_sysctls
            .iter()
            .filter(|e| e.profile == "squid-pods")
            .count();
        let entries =
            pod_workload::ledger_pod_entries(nodetune::sysctl::DEFAULT_STATE_DIR, &squid_uid)?;
        Ok((applied && n == 3 && entries.len() == 3).then_some(entries))
    })
    .await?;
    // The profile's status sums the keys over the nodes' pods (one selected pod here).
    wait_for("podSysctls in the profile status", WAIT, POLL, || async {
        let status = profiles.get("squid-pods").await?.status.unwrap_or_default();
        let totals: Vec<_> = status
            .pod_sysctls
            .iter()
            .map(|t| (t.pods, t.applied, t.failed))
            .collect();
        Ok((totals == [(1, 1, 0); 3]).then_some(()))
    })
    .await?;
    Ok(PodsTuned {
        squid: (squid_pid, squid_uid),
        squid_defaults,
        squid_entries,
        other: (other_pid, other_defaults),
    })
}

/// Scenario 8: after the agent's restart the pod still holds its values and the ledger its
/// entries as they were (nothing restored, nothing recorded again); a pod created afterwards
/// gets the values (time from Running printed); unselecting a living pod restores its
/// originals; a deleted pod leaves no ledger entry.
async fn pods_after_restart(
    cluster: &Cluster,
    a: &KubeletNode,
    image: &str,
    tuned: PodsTuned,
) -> Result<()> {
    let state_dir = nodetune::sysctl::DEFAULT_STATE_DIR;
    let (squid_pid, squid_uid) = &tuned.squid;
    ensure!(
        pod_workload::sysctls(*squid_pid, &POD_KEYS).await? == POD_WANTED,
        "restart restored the pod"
    );
    ensure!(
        pod_workload::ledger_pod_entries(state_dir, squid_uid)? == tuned.squid_entries,
        "restart changed the pod's ledger entries"
    );

    let created = new_pod_gets_values(cluster, a, image).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), pod_workload::POD_NS);

    let t = Instant::now();
    pods.patch(
        "squid-e2e-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "unselected"}}})),
    )
    .await?;
    wait_for(
        "the unselected pod's originals back",
        WAIT,
        POLL,
        || async {
            let back = pod_workload::sysctls(*squid_pid, &POD_KEYS).await? == tuned.squid_defaults;
            let entries = pod_workload::ledger_pod_entries(state_dir, squid_uid)?;
            Ok((back && entries.is_empty()).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "unselected: originals back in the living pod in {:?}",
        t.elapsed()
    );

    let new_uid = uid_of(&created);
    ensure!(pod_workload::ledger_pod_entries(state_dir, &new_uid)?.len() == 3);
    pod_workload::delete(cluster, "squid-e2e-1").await?;
    wait_for(
        "no ledger entry left by the deleted pod",
        WAIT,
        POLL,
        || async {
            Ok(pod_workload::ledger_pod_entries(state_dir, &new_uid)?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    ensure!(
        pod_workload::sysctls(tuned.other.0, &POD_KEYS).await? == tuned.other.1,
        "unselected pod changed"
    );

    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    profiles
        .delete("squid-pods", &DeleteParams::default())
        .await?;
    for name in ["squid-e2e-0", "other-e2e"] {
        pod_workload::delete(cluster, name).await?;
    }
    // The scenarios after this one start from what they had before pods were added.
    wait_for(
        "the pod profile and workload pods gone",
        WAIT,
        POLL,
        || async {
            let profile = profiles.get_opt("squid-pods").await?;
            let left = pods.list(&ListParams::default()).await?.items;
            Ok((profile.is_none() && left.is_empty()).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Creates squid-e2e-1 and polls (every 50 ms) for Running and for its values; prints both
/// times from creation. The values may come first: the sandbox exists before Running.
async fn new_pod_gets_values(cluster: &Cluster, a: &KubeletNode, image: &str) -> Result<Pod> {
    let spec = pod_workload::workload_pod("squid-e2e-1", "squid-e2e", "node-a", image, QUIET_LOAD)?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), pod_workload::POD_NS);
    let t = Instant::now();
    let created = pods
        .create(&kube::api::PostParams::default(), &spec)
        .await?;
    let mut running = None;
    let tuned = loop {
        ensure!(t.elapsed() < WAIT, "squid-e2e-1 never held its values");
        let p = pods.get("squid-e2e-1").await?;
        if running.is_none() && p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
            running = Some(t.elapsed());
        }
        if let Some(pid) = a
            .container_pid(pod_workload::POD_NS, "squid-e2e-1", "workload")
            .await?
            && pod_workload::sysctls(pid, &POD_KEYS)
                .await
                .is_ok_and(|v| v == POD_WANTED)
        {
            break t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "new pod: Running seen after {running:?}, values held after {tuned:?} (from creation)"
    );
    Ok(created)
}
