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
use support::fixtures::ROLE;
use support::sockets::{SocketLoad, nonzero, ss_counts};
use support::{Cluster, SimNode, kubectl, run, wait_for};

const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
/// On kubelet nodes only: the controller and the uninstall hook are pinned to them, since the
/// node shim plays the kubelet for long-running pods and never completes a Job.
const RUNTIME: &str = "nodetune.test/runtime";
/// Generous: image unpacking and the kubelet's sync loops on a small shared machine.
const WAIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(500);

const PROFILE: &str = "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: web-server}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  priority: 10
  sysctls:
    net.ipv4.tcp_tw_reuse: \"1\"
    net.ipv4.ip_local_port_range: \"32768 65000\"
";
const TW_REUSE: &str = "net.ipv4.tcp_tw_reuse";
const PORT_RANGE: &str = "net.ipv4.ip_local_port_range";

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
    let p: NodeTuningProfile = serde_yaml::from_str(PROFILE)?;
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
