//! Pod counting end to end on a real control plane: the agent DaemonSet as shipped (pod
//! counting on, RBAC for pods from deploy/nodetune.yaml) on a simulated node, and a pod whose
//! sandbox is a real process in a network namespace of its own, in a cgroup named after the
//! Pod object's UID as the kubelet names it. The node's report must list the pod, by namespace
//! and name, with the counts `nsenter -t PID -n ss -tan` gives in its namespace; the node's own
//! counts must not include the pod's sockets; the profile status sums the pods.
//!
//! Run: NODETUNE_REQUIRE_CLUSTER=1 cargo test --test e2e_podnet -- --include-ignored --nocapture
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use nodetune::api::{NodeTuningProfile, NodeTuningReport};
use support::sockets::{nonzero, ss_counts};
use support::{Cluster, SimNode, wait_for};

const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(500);

/// The pod's sandbox: a process in a namespace of its own holding sockets; killed on drop,
/// then its cgroup removed.
struct Sandbox {
    child: Child,
    cgroup: PathBuf,
}

impl Sandbox {
    fn start(uid: &str) -> Result<Self> {
        let script = r#"
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(512)
port = srv.getsockname()[1]
held = []
for _ in range(40):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); held += [c, s]
for _ in range(150):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); time.sleep(0.002); s.close()
for _ in range(15):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); held += [s]
print("ready", flush=True)
time.sleep(600)
"#;
        let cgroup = PathBuf::from("/sys/fs/cgroup/systemd")
            .join(format!("nte2e-{}", std::process::id()))
            .join(format!("kubepods/besteffort/pod{uid}"));
        std::fs::create_dir_all(&cgroup).context("making the pod's cgroup")?;
        let mut child = Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "ip link set lo up && exec python3 -c \"$0\"",
                script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the sandbox")?;
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "sandbox said {line:?}");
        Ok(Self { child, cgroup })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in self.cgroup.ancestors().take(4) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `ss -tanH` in the sandbox's namespace, netstat names, zeros left out.
fn ss_in(pid: u32) -> Result<BTreeMap<String, i64>> {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "ss", "-tanH"])
        .output()?;
    ensure!(out.status.success(), "nsenter ss failed");
    let mut counts = BTreeMap::new();
    for state in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        let name = match state {
            "ESTAB" => "ESTABLISHED",
            "FIN-WAIT-2" => "FIN_WAIT2",
            "TIME-WAIT" => "TIME_WAIT",
            "CLOSE-WAIT" => "CLOSE_WAIT",
            other => other,
        };
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn reports_list_a_pods_own_namespace_counts_by_name() {
    let Some(bin) = support::cluster_prereqs("reports_list_a_pods_own_namespace_counts_by_name")
    else {
        return;
    };
    let cluster = Cluster::start(&bin).await.expect("control plane starts");
    if let Err(e) = scenario(&cluster).await {
        panic!("{e:#}\ndiagnostics:\n{}", cluster.diagnostics());
    }
}

/// node-a selected by a profile, the operator deployed as shipped, and the Pod object squid-0 on
/// node-a with its sandbox: the Pod's UID and the sandbox.
async fn deploy_with_pod(cluster: &Cluster) -> Result<(SimNode, String, Sandbox)> {
    let node = cluster.add_node("node-a", &[("role", "web")]).await?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(cluster, &deploy).await?;

    // The Pod object (the shim reports it Running), and its sandbox on the node.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "squid-0"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "squid", "image": "example.com/squid:6"}]}
    }))?;
    let uid = pods
        .create(&PostParams::default(), &pod)
        .await?
        .uid()
        .context("pod uid")?;
    let sandbox = Sandbox::start(&uid)?;

    let profile: NodeTuningProfile = serde_yaml::from_str(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: web}\n\
         spec:\n  nodeSelector: {matchLabels: {role: web}}\n  sysctls: {net.ipv4.tcp_fin_timeout: \"30\"}\n",
    )?;
    support::e2e::apply_profile(cluster, &profile).await?;
    Ok((node, uid, sandbox))
}

async fn scenario(cluster: &Cluster) -> Result<()> {
    let (node, uid, sandbox) = deploy_with_pod(cluster).await?;

    let want = ss_in(sandbox.pid())?;
    ensure!(
        want.get("TIME_WAIT").copied().unwrap_or_default() >= 150,
        "{want:?}"
    );
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let status = wait_for(
        "the report's top pods list squid-0 with ss's counts",
        WAIT,
        POLL,
        || async {
            let Some(status) = reports.get_opt("node-a").await?.and_then(|r| r.status) else {
                return Ok(None);
            };
            let listed = status
                .pods
                .as_ref()
                .and_then(|p| p.top.iter().find(|t| t.uid == uid));
            Ok(listed
                .filter(|t| (t.namespace.as_str(), t.name.as_str()) == ("default", "squid-0"))
                .filter(|t| nonzero(&t.states) == want)
                .map(|_| status.clone()))
        },
    )
    .await?;
    // The node's own counts are the node namespace's, without the pod's sockets: the node holds
    // only the agent's few API connections, the pod 150 TIME_WAIT and 15 CLOSE_WAIT.
    let host = |state: &str| status.tcp.total.get(state).copied().unwrap_or_default();
    ensure!(
        host("TIME_WAIT") < want["TIME_WAIT"] && host("CLOSE_WAIT") < want["CLOSE_WAIT"],
        "host counts {:?}",
        status.tcp.total
    );
    let node_now = ss_counts(&node).await?;
    ensure!(
        node_now.get("TIME_WAIT").copied().unwrap_or_default() < want["TIME_WAIT"],
        "the node's namespace holds no pod sockets: {node_now:?}"
    );
    let pods_tw = status.pods.as_ref().map_or(0, |p| p.time_wait);
    ensure!(pods_tw >= want["TIME_WAIT"], "pods' TIME_WAIT {pods_tw}");

    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    wait_for("the profile status sums the pods", WAIT, POLL, || async {
        let p = profiles.get("web").await?;
        let tw = p
            .status
            .and_then(|s| s.pod_tcp_states.get("TIME_WAIT").copied())
            .unwrap_or_default();
        Ok((tw >= want["TIME_WAIT"]).then_some(()))
    })
    .await?;
    Ok(())
}
