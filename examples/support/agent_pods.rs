//! `bench_agent --pods N`: the real agent idle on a node hosting N pods. One simulated node,
//! the operator as shipped (pod counting and pod targeting on), the 30-key node profile; the
//! agent is measured for a window with no pods, then N Pod objects are bound to the node (the
//! node shim reports them Running, so the agent's pod watch caches them), each with a stand-in
//! sandbox ([`crate::pod_standins`]: an `unshare -n` process holding 10 ESTABLISHED, a listener
//! and about 4 TIME_WAIT, in a kubelet-shaped cgroup named after the Pod's UID), a pod profile of
//! [`POD_KEYS`] selects them all, and once the report shows every pod counted and holding the
//! keys, the agent is measured for another window. The stand-ins and their cgroups go when
//! this returns, whether it succeeded or not.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use crate::pod_standins::{Shape, StandIns};
use crate::{
    HEARTBEAT, INTERVAL, KEYS, LABEL, header, measure, print_window, support, wait_report,
};
use nodetune::api::{NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport};

const NODE: &str = "node-pods";
const POD_LABEL: (&str, &str) = ("app", "nodetune-bench-pod");
const POD_PROFILE: &str = "bench-pods";

/// Keys the pod profile sets inside every pod, each unlike a fresh namespace's default.
const POD_KEYS: [(&str, &str); 3] = [
    ("net.ipv4.tcp_fin_timeout", "25"),
    ("net.ipv4.tcp_tw_reuse", "1"),
    ("net.ipv4.ip_local_port_range", "20000 60999"),
];

fn pod_profile() -> NodeTuningProfile {
    let labels = |(k, v): (&str, &str)| LabelSelector {
        match_labels: Some([(k.to_string(), v.to_string())].into()),
        ..Default::default()
    };
    NodeTuningProfile::new(
        POD_PROFILE,
        NodeTuningProfileSpec {
            node_selector: Some(labels(LABEL)),
            pod_selector: Some(labels(POD_LABEL)),
            sysctls: POD_KEYS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    )
}

/// Creates `n` Pod objects bound to `node`; their UIDs, in order.
async fn create_pods(client: &kube::Client, node: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut uids = Vec::with_capacity(n);
    for i in 0..n {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("bench-pod-{i:03}"), "labels": {POD_LABEL.0: POD_LABEL.1}},
            "spec": {"nodeName": node, "containers": [{"name": "proxy", "image": "example.com/proxy:1"}]}
        }))?;
        let made = pods.create(&PostParams::default(), &pod).await?;
        uids.push(made.uid().context("a created pod has no UID")?);
    }
    Ok(uids)
}

/// Whether the report shows `n` pods counted and every pod key held in all of them.
fn settled(s: &nodetune::api::NodeTuningReportStatus, n: usize) -> bool {
    let counted = s.pods.as_ref().is_some_and(|p| p.namespaces as usize >= n);
    let held = POD_KEYS.iter().all(|(k, _)| {
        s.pod_sysctls
            .iter()
            .any(|e| e.key == *k && e.applied as usize >= n && e.failed == 0)
    });
    counted && held
}

/// What the node's report says of its pods, and one pod's values read with `nsenter`.
async fn print_pods(reports: &Api<NodeTuningReport>, sandbox: Option<u32>) -> anyhow::Result<()> {
    let status = reports.get(NODE).await?.status.unwrap_or_default();
    if let Some(p) = &status.pods {
        let state = |k: &str| p.states.get(k).copied().unwrap_or(0);
        println!(
            "  report: {} pod namespaces counted (skipped {}, truncated {}), sockstat TIME_WAIT {}, in use {}; last walk: ESTABLISHED {}, TIME_WAIT {}, LISTEN {}; top pods listed: {}",
            p.namespaces,
            p.skipped,
            p.truncated,
            p.time_wait,
            p.in_use,
            state("ESTABLISHED"),
            state("TIME_WAIT"),
            state("LISTEN"),
            p.top.len()
        );
    }
    for e in &status.pod_sysctls {
        println!(
            "  {} = {:?}: {} pods selected, {} applied, {} failed",
            e.key, e.desired, e.pods, e.applied, e.failed
        );
    }
    if let Some(pid) = sandbox {
        let (key, want) = POD_KEYS[0];
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let out = tokio::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "cat", &path])
            .output()
            .await?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got != want {
            bail!("the first pod holds {key} = {got:?}, not {want:?}");
        }
        println!("  nsenter into the first pod: {key} = {got}");
    }
    Ok(())
}

/// Runs the benchmark (see the module's comment).
pub async fn run(nodetune: &Path, n: usize, window: u64) -> anyhow::Result<()> {
    let Some(bin) = support::cluster_prereqs("bench_agent") else {
        bail!("prerequisites missing (see above)");
    };
    let cluster = support::Cluster::start(&bin).await?;
    let node = cluster.add_node(NODE, &[LABEL]).await?;
    crate::deploy_operator(&cluster, nodetune, std::slice::from_ref(&node)).await?;
    let client = cluster.client();
    let reports = Api::<NodeTuningReport>::all(client.clone());
    println!(
        "agent ({}, interval {INTERVAL}, heartbeat {HEARTBEAT}, pod counting and targeting on) applied {} keys on {NODE}; windows of {window} s",
        nodetune.display(),
        KEYS.len()
    );
    header();
    let idle = measure(&node, window).await?;
    print_window(&format!("{NODE}, no pods"), &idle);

    // Declared after the cluster, so dropped (killed, cgroups removed) before it.
    let mut standins = StandIns::new(Shape::default())?;
    let t = Instant::now();
    let uids = create_pods(&client, NODE, n).await?;
    for uid in &uids {
        standins.add(uid)?;
    }
    tokio::task::block_in_place(|| standins.wait_ready())?;
    println!(
        "  {n} Pod objects and stand-ins ready in {:.1} s (cgroups under {})",
        t.elapsed().as_secs_f64(),
        standins.dir().display()
    );
    Api::<NodeTuningProfile>::all(client.clone())
        .create(&PostParams::default(), &pod_profile())
        .await?;
    let what = format!("{n} pods counted and {} keys held in each", POD_KEYS.len());
    wait_report(&reports, NODE, &what, Duration::from_secs(600), |s| {
        settled(s, n)
    })
    .await?;
    println!(
        "  {what}: {:.1} s after the first Pod was created",
        t.elapsed().as_secs_f64()
    );
    let busy = measure(&node, window).await?;
    print_window(&format!("{NODE}, {n} pods"), &busy);
    print_pods(&reports, standins.pods().first().map(|p| p.pid())).await?;
    standins.cleanup()?;
    println!("  stand-ins stopped, their cgroups removed");
    Ok(())
}
