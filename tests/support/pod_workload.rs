//! Workload pods on kubelet nodes for the pod-namespace scenarios: `nodetune test-workload`
//! (the nodetune image's hidden stand-in for a busy proxy) holding ESTABLISHED and CLOSE_WAIT
//! sockets and making TIME_WAIT ones in its own network namespace, read from the outside with
//! `nsenter -t PID -n` (`ss`, `sysctl`).
use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use super::kubelet::KubeletNode;
use super::{Cluster, wait_for};

/// Where the workload pods run.
pub const POD_NS: &str = "default";

/// What a workload pod holds: 2 x `established` ESTABLISHED sockets, `close_wait` CLOSE_WAIT
/// ones, and `churn_rate` TIME_WAIT ones a second for `churn_seconds` (then no more, so the
/// counts hold still until the first TIME_WAIT expires, 60 s after it was made).
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub established: u32,
    pub close_wait: u32,
    pub churn_rate: u32,
    pub churn_seconds: u32,
}

/// The pod spec: `image` (imported, never pulled) on `node`, labelled `app`.
pub fn workload_pod(name: &str, app: &str, node: &str, image: &str, load: Load) -> Result<Pod> {
    let args: Vec<String> = [
        "test-workload".to_string(),
        format!("--established={}", load.established),
        format!("--close-wait={}", load.close_wait),
        format!("--churn-rate={}", load.churn_rate),
        format!("--churn-seconds={}s", load.churn_seconds),
    ]
    .into();
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": POD_NS, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "workload",
                "image": image,
                "imagePullPolicy": "Never",
                "args": args,
            }],
        },
    }))?)
}

/// Creates the pod and waits for its container's process: its PID on this machine.
pub async fn start(cluster: &Cluster, node: &KubeletNode, pod: &Pod) -> Result<(u32, Pod)> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), POD_NS);
    let created = pods.create(&PostParams::default(), pod).await?;
    let name = created.metadata.name.clone().context("pod name")?;
    let wait = std::time::Duration::from_secs(180);
    let poll = std::time::Duration::from_millis(200);
    let pid = wait_for(&format!("workload {name} running"), wait, poll, || async {
        node.container_pid(POD_NS, &name, "workload").await
    })
    .await?;
    Ok((pid, pods.get(&name).await?))
}

/// Deletes the pod now (grace 0).
pub async fn delete(cluster: &Cluster, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), POD_NS);
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(())
}

async fn nsenter(pid: u32, cmd: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n"])
        .args(cmd)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "nsenter -t {pid} -n {cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A key's value in the pod's namespace, whitespace runs as one space.
pub async fn sysctl(pid: u32, key: &str) -> Result<String> {
    let out = nsenter(pid, &["sysctl", "-n", key]).await?;
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Several keys' values in the pod's namespace.
pub async fn sysctls(pid: u32, keys: &[&str]) -> Result<Vec<String>> {
    let mut values = Vec::new();
    for k in keys {
        values.push(sysctl(pid, k).await?);
    }
    Ok(values)
}

/// `ss -tanH` in the pod's namespace, per state in netstat's names (LISTEN included).
pub async fn ss_counts(pid: u32) -> Result<BTreeMap<String, i64>> {
    let out = nsenter(pid, &["ss", "-tanH"]).await?;
    let mut counts = BTreeMap::new();
    for state in out.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(name) = super::socket_script::netstat_name(state) else {
            bail!("unknown ss state {state}")
        };
        *counts.entry(name.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// The pod entries of the ledger in `state_dir` for pod `uid` (the agent's hostPath).
pub fn ledger_pod_entries(state_dir: &str, uid: &str) -> Result<Vec<serde_json::Value>> {
    let path = std::path::Path::new(state_dir).join("ledger.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("read the ledger"),
    };
    let ledger: serde_json::Value = serde_json::from_str(&text)?;
    Ok(ledger
        .get("podEntries")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("podUid").and_then(serde_json::Value::as_str) == Some(uid))
        .cloned()
        .collect())
}
