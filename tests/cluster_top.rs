//! `kubectl nodetune top` and the report's pod columns on a real kube-apiserver: reports with
//! `status.pods` pass the CRD schema, `kubectl get ntr` shows pod TIME_WAIT beside host
//! TIME_WAIT, and the binary installed as `kubectl-nodetune` works as a kubectl plugin and
//! ranks pods and nodes across the cluster.
//!
//! Run: NODETUNE_REQUIRE_CLUSTER=1 cargo test --test cluster_top -- --include-ignored --nocapture

mod support;

use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nodetune::api::{NodeTuningReport, NodeTuningReportSpec};
use serde_json::json;

use support::{Cluster, cluster_prereqs, kubectl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn kubectl_nodetune_top_ranks_pods_and_nodes_from_reports() {
    let Some(bin) = cluster_prereqs("kubectl_nodetune_top_ranks_pods_and_nodes_from_reports")
    else {
        return;
    };
    let cluster = Cluster::start(&bin).await.expect("control plane starts");
    if let Err(e) = run(&cluster).await {
        panic!("{e:#}");
    }
}

fn pod(name: &str, tw: i64, cw: i64) -> serde_json::Value {
    json!({
        "namespace": "web", "name": name, "uid": format!("{:0>8}-0000-4000-8000-000000000000", tw),
        "timeWait": tw, "total": tw + cw + 80,
        "states": [
            {"state": "ESTABLISHED", "total": 80},
            {"state": "TIME_WAIT", "total": tw},
            {"state": "CLOSE_WAIT", "total": cw}
        ]
    })
}

async fn report(
    cluster: &Cluster,
    node: &str,
    host_tw: i64,
    pods: Vec<serde_json::Value>,
) -> Result<()> {
    let api: Api<NodeTuningReport> = Api::all(cluster.client());
    let r = NodeTuningReport::new(
        node,
        NodeTuningReportSpec {
            node_name: node.into(),
        },
    );
    api.create(&PostParams::default(), &r)
        .await
        .context("create report")?;
    let pods_tw: i64 = pods.iter().filter_map(|p| p["timeWait"].as_i64()).sum();
    let status = json!({"status": {
        "tcp": {"source": "netlink-single-walk", "states": [
            {"state": "TIME_WAIT", "ipv4": host_tw, "ipv6": 0, "total": host_tw}
        ]},
        "pods": {"namespaces": pods.len(), "timeWait": pods_tw, "inUse": 1, "top": pods}
    }});
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("status of {node}"))?;
    Ok(())
}

async fn run(cluster: &Cluster) -> Result<()> {
    support::deploy::apply_crds(cluster).await?;
    report(
        cluster,
        "node-a",
        5,
        vec![pod("squid-0", 1_478, 15), pod("idle", 0, 0)],
    )
    .await?;
    report(cluster, "node-b", 900, vec![pod("nginx-1", 300, 40)]).await?;
    printer_columns(cluster).await?;
    plugin(cluster).await
}

/// `kubectl get ntr`: host and pod TIME_WAIT side by side.
async fn printer_columns(cluster: &Cluster) -> Result<()> {
    let table = kubectl(cluster, &["get", "ntr", "node-a"]).await?;
    let mut lines = table.lines();
    let header = lines.next().context("header")?;
    let row = lines.next().context("row")?;
    // Columns by their header's offsets: empty cells (no profiles) leave no token to split on.
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|(i, c)| *c != ' ' && (*i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let cell = |name: &str| -> Option<&str> {
        let k = starts
            .iter()
            .position(|s| header[*s..].split(' ').next() == Some(name))?;
        let end = starts
            .get(k + 1)
            .copied()
            .unwrap_or(row.len())
            .min(row.len());
        row.get(starts[k]..end).map(str::trim)
    };
    ensure!(
        (cell("TIME_WAIT"), cell("POD_TIME_WAIT")) == (Some("5"), Some("1478")),
        "{table}"
    );
    Ok(())
}

/// The binary as a kubectl plugin, ranking the reports' pods and nodes.
async fn plugin(cluster: &Cluster) -> Result<()> {
    let plugins = tempfile::tempdir()?;
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_nodetune"),
        plugins.path().join("kubectl-nodetune"),
    )?;
    let path = format!(
        "{}:{}",
        plugins.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cluster
        .kubectl()
        .args(["nodetune", "top", "-o", "json"])
        .env("PATH", &path)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "kubectl nodetune top: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pods: Vec<(&str, i64)> = view["pods"]
        .as_array()
        .context("pods")?
        .iter()
        .filter_map(|p| Some((p["pod"].as_str()?, p["timeWait"].as_i64()?)))
        .collect();
    ensure!(
        pods == [("squid-0", 1_478), ("nginx-1", 300), ("idle", 0)],
        "{view}"
    );
    ensure!(view["nodes"][0]["node"] == "node-a", "{view}");

    let out = cluster
        .kubectl()
        .args(["nodetune", "top", "--sort-by", "close-wait", "--limit", "1"])
        .env("PATH", &path)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.lines().nth(1).is_some_and(|l| l.contains("nginx-1")),
        "{text}"
    );
    let help = cluster
        .kubectl()
        .args(["nodetune", "top", "--help"])
        .env("PATH", &path)
        .output()
        .await?;
    ensure!(
        String::from_utf8_lossy(&help.stdout).contains("kubectl nodetune top"),
        "plugin names itself as invoked"
    );
    Ok(())
}
