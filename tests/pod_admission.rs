//! Pod-targeting profiles at admission, on a real kube-apiserver: the chart's
//! ValidatingAdmissionPolicy (rendered with its default values, which allow every scope) refuses
//! a profile with `spec.podSelector` or `spec.namespaceSelector` holding a key whose scope is
//! not NetworkNamespace, naming the key and why, and admits NetworkNamespace keys; host profiles
//! keep every scope. Needs root and the control-plane binaries (tests/cluster/build).
//!
//! Run: cargo test --test pod_admission -- --include-ignored --nocapture

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};

use support::Cluster;

/// A profile with one key; `target` is extra spec lines (selectors), or "" for a host profile.
fn profile(target: &str, key: &str) -> String {
    format!(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {{name: pods}}\n\
         spec:\n{target}  sysctls:\n    {}: \"1\"\n",
        serde_json::Value::String(key.into()),
    )
}

const POD_SELECTOR: &str = "  podSelector:\n    matchLabels: {app.kubernetes.io/name: squid}\n";
const NAMESPACE_SELECTOR: &str = "  namespaceSelector: {}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn pod_targeting_profiles_take_only_network_namespace_keys() {
    let Some(bin) =
        support::cluster_prereqs("pod_targeting_profiles_take_only_network_namespace_keys")
    else {
        return;
    };
    if let Err(e) = run(&bin).await {
        panic!("{e:#}");
    }
}

/// CRDs, then the chart's admission policy and binding (nothing else of the chart).
async fn install(cluster: &Cluster) -> Result<()> {
    support::deploy::apply_crds(cluster).await?;
    support::kubectl(cluster, &["create", "namespace", "nodetune-system"]).await?;
    let policy = support::helm::template(
        &cluster.bin("helm"),
        &["--show-only", "templates/policy.yaml"],
    )
    .map_err(|stderr| anyhow::anyhow!("helm template: {stderr}"))?;
    let policy_file = cluster.dir().join("policy.yaml");
    std::fs::write(&policy_file, policy)?;
    support::kubectl(cluster, &["apply", "-f", &policy_file.to_string_lossy()]).await?;
    Ok(())
}

async fn run(bin: &std::path::Path) -> Result<()> {
    let cluster = Cluster::start(bin).await?;
    install(&cluster).await?;
    // The policy is enforced once the apiserver has compiled it: wait for the first refusal.
    let refused = support::wait_for(
        "the admission policy to refuse vm.swappiness in a pod-targeting profile",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            Ok(cluster
                .dry_run_apply(&profile(POD_SELECTOR, "vm.swappiness"))
                .await?
                .err())
        },
    )
    .await?;
    ensure!(
        refused.contains("\"vm.swappiness\" has scope Node")
            && refused.contains("pod-targeting profile")
            && refused.contains("NetworkNamespace"),
        "the refusal names the key, its scope and why: {refused}"
    );

    for (target, key, ok, needle) in [
        (POD_SELECTOR, "net.ipv4.tcp_fin_timeout", true, ""),
        (POD_SELECTOR, "-net/ipv4/tcp_tw_reuse", true, ""),
        (NAMESPACE_SELECTOR, "net.core.somaxconn", true, ""),
        (
            POD_SELECTOR,
            "-vm.dirty_ratio",
            false,
            "\"vm.dirty_ratio\" has scope Node",
        ),
        (
            POD_SELECTOR,
            "net.core.rmem_max",
            false,
            "\"net.core.rmem_max\" has scope Node",
        ),
        (
            NAMESPACE_SELECTOR,
            "kernel.shmmax",
            false,
            "has scope IPCNamespace",
        ),
        (
            NAMESPACE_SELECTOR,
            "vm/swappiness",
            false,
            "\"vm.swappiness\" has scope Node",
        ),
        // Host profiles keep every scope the cluster policy allows.
        ("", "vm.swappiness", true, ""),
        ("", "net.core.rmem_max", true, ""),
    ] {
        match cluster.dry_run_apply(&profile(target, key)).await? {
            Ok(_) => ensure!(ok, "{key} ({target:?}): admitted, should be refused"),
            Err(e) => ensure!(!ok && e.contains(needle), "{key} ({target:?}): {e}"),
        }
    }
    // The README's example is admitted as shipped.
    let example =
        std::fs::read_to_string(support::repo_root().join("deploy/examples/squid-pods.yaml"))?;
    if let Err(e) = cluster.dry_run_apply(&example).await? {
        anyhow::bail!("deploy/examples/squid-pods.yaml refused: {e}");
    }
    Ok(())
}
