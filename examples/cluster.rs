//! A local demo cluster whose simulated nodes run real agents: the control plane of
//! `tests/cluster/up`, simulated nodes, and the test node shim (tests/support), so pods of
//! nodetune's DaemonSet start the locally built binary inside the nodes' network namespaces.
//! Runs until Ctrl-C or SIGTERM, or until `tests/cluster/down` stops its cluster, then stops
//! everything (processes, namespaces, its temp dir).
//!
//!   cargo build && cargo run --example cluster -- node-a:role=web node-b    (as root)
//!
//! Arguments: nodes as `NAME[:label=value,...]` (default: node-a node-b node-c).
//! Env: NODETUNE_AGENT_BIN (default: the `nodetune` binary next to this example's target
//! dir), NODETUNE_CLUSTER_BIN (see tests/cluster/build).
//! Without the shim (no agents), the shell scripts alone do: tests/cluster/README.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;

use anyhow::Context;

fn agent_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NODETUNE_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/examples/cluster -> target/<profile>/nodetune
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("nodetune"))
        .context("locate target dir")?;
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: run `cargo build` first or set NODETUNE_AGENT_BIN",
        bin.display()
    );
    Ok(bin)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(bin) = support::cluster_prereqs("examples/cluster") else {
        anyhow::bail!("prerequisites missing (see above)");
    };
    let agent = agent_bin()?;
    let mut specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        specs = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
    }
    let cluster = support::Cluster::start(&bin).await?;
    cluster.start_shim(&agent)?;
    for spec in &specs {
        let (name, labels) = spec.split_once(':').unwrap_or((spec, ""));
        let labels: Vec<(&str, &str)> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| l.split_once('=').unwrap_or((l, "")))
            .collect();
        let node = cluster.add_node(name, &labels).await?;
        println!("node {name}: netns {} ip {}", node.netns, node.ip);
    }
    println!(
        "control plane up in {:?}; agent binary {}\n\
         export KUBECONFIG={}\n\
         export PATH={}:$PATH   # kubectl, helm\n\
         pod logs: {}/pods/\nCtrl-C stops the cluster.",
        cluster.startup_time(),
        agent.display(),
        cluster.kubeconfig().display(),
        bin.display(),
        cluster.dir().display(),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
        () = stopped_from_outside(cluster.dir()) => {
            println!("the cluster was stopped from outside (tests/cluster/down)");
        }
    }
    println!("stopping");
    drop(cluster);
    Ok(())
}

/// Resolves once `tests/cluster/down` has run on `dir` (it renames cluster.env), so a runner
/// whose cluster is gone exits and cleans up instead of looping on watch errors.
async fn stopped_from_outside(dir: &std::path::Path) {
    let env = dir.join("cluster.env");
    while env.exists() {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
