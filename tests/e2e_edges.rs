//! Sharp edges of issue 17 on a real control plane (items 11, 12, 13 and 16): the controller
//! and the agents run as shipped in deploy/nodetune.yaml, the agents through the node shim on
//! simulated nodes (network namespaces); sysctls are read with `sysctl -n` inside them.
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReport};
use nodetune::names::AGENT_POD_SELECTOR;
use support::e2e::{Env, NS, POLL, Restarts};
use support::fixtures::{ROLE, condition_full, is_current, profile, profile_entry};
use support::sockets::SocketLoad;
use support::{Cluster, deploy, wait_for};

const FIN: &str = "net.ipv4.tcp_fin_timeout";
const NODE: &str = "node-a";

/// One simulated node (`node-a`, role web), the shim, and nodetune as shipped with short
/// agent intervals.
async fn setup(test: &str) -> Result<Option<Env>> {
    Env::start(test, &[(NODE, "web")]).await
}

/// As [`setup`], with the agent's pass interval set to `interval`.
async fn setup_with_agent_interval(test: &str, interval: &str) -> Result<Option<Env>> {
    Env::start_with(test, &[(NODE, "web")], Restarts::Default, |d| {
        deploy::short_intervals(d)?;
        deploy::set_env(
            deploy::controller_container(d)?,
            &[("NODETUNE_AGENT_INTERVAL", interval)],
        );
        Ok(())
    })
    .await
}

/// Status of a report condition by type name.
fn report_condition(
    s: &nodetune::api::NodeTuningReportStatus,
    type_: &str,
) -> Option<(String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// fin_timeout 33 on the web nodes.
fn base() -> NodeTuningProfile {
    profile("base").role("web").sysctls(&[(FIN, "33")]).build()
}

/// Item 11: a higher-priority DryRun profile on the same key used to make the Enforce
/// profile's entry `Overridden`: the key was neither enforced nor corrected on drift. Now the
/// enforced value holds (drift corrected), and the preview is reported as DryRun on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane binaries (tests/cluster/build)"]
async fn dry_run_preview_keeps_enforcement() -> Result<()> {
    let Some(env) = setup("dry_run_preview_keeps_enforcement").await? else {
        return Ok(());
    };
    env.apply(&base()).await?;
    env.apply(
        &profile("preview")
            .dry_run()
            .priority(100)
            .role("web")
            .sysctls(&[("net.ipv4.tcp_fin_timeout", "22")])
            .build(),
    )
    .await?;
    env.wait_sysctl(NODE, FIN, "33").await?;
    let s = env
        .wait_report(NODE, "base Applied, preview DryRun", |s| {
            profile_entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Applied)
                && profile_entry(s, FIN, "preview").is_some_and(|e| e.state == KeyState::DryRun)
        })
        .await?;
    let preview = profile_entry(&s, FIN, "preview").context("preview entry")?;
    let msg = preview.message.as_deref().unwrap_or_default();
    assert!(
        msg.contains("\"33\" to \"22\"") && msg.contains("base"),
        "{msg}"
    );
    assert!(
        s.profiles.iter().all(|p| p.overridden_keys.is_empty()),
        "{:?}",
        s.profiles
    );

    // Drift is still corrected: set by hand, put back by the agent.
    env.node(NODE)
        .exec_ok(&["sysctl", "-w", "net.ipv4.tcp_fin_timeout=2"])
        .await?;
    env.wait_sysctl(NODE, FIN, "33").await?;
    env.wait_report(NODE, "a drift correction counted", |s| {
        s.drift_corrections >= 1
    })
    .await?;
    for name in ["base", "preview"] {
        let p = env
            .wait_profile(name, "Ready, not Conflicted", |p| {
                is_current(p)
                    && condition_full(p, "Ready").is_some_and(|c| c.0 == "True")
                    && condition_full(p, "Conflicted").is_some_and(|c| c.0 == "False")
            })
            .await?;
        assert_eq!(p.status.as_ref().map(|s| s.applied_nodes), Some(1));
    }
    Ok(())
}

/// Item 12: a policy change (here the ConfigMap patched as `helm upgrade` would) reaches the
/// agents: the shim now refreshes projected ConfigMaps as a kubelet does, and the agent checks
/// its policy file every couple of seconds instead of at its next pass. The agent's interval
/// is set to ten minutes, so only the file check can explain a change within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane binaries (tests/cluster/build)"]
async fn policy_change_reaches_the_agent() -> Result<()> {
    let Some(env) = setup_with_agent_interval("policy_change_reaches_the_agent", "600s").await?
    else {
        return Ok(());
    };
    env.apply(&base()).await?;
    env.wait_sysctl(NODE, FIN, "33").await?;
    env.wait_report(NODE, "the key Applied", |s| {
        profile_entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Applied)
    })
    .await?;

    let policy = "allowedScopes: [\"Node\",\"NetworkNamespace\",\"IPCNamespace\"]\n\
                  deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']\n";
    Api::<ConfigMap>::namespaced(env.cluster.client(), NS)
        .patch(
            "nodetune-policy",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"policy.yaml": policy}})),
        )
        .await?;
    let s = env
        .wait_report(NODE, "the key Denied by the new policy", |s| {
            profile_entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Denied)
        })
        .await?;
    let msg = profile_entry(&s, FIN, "base")
        .and_then(|e| e.message.clone())
        .unwrap_or_default();
    assert!(msg.contains("deniedKeys"), "{msg}");
    Ok(())
}

/// Item 13: TIME_WAIT at the bucket cap said nothing. With `tcp_max_tw_buckets: 50` and 80
/// short connections on the node (the 5000 and 8000, scaled down), the node's report
/// and the profile carry a TimeWaitPressure warning and an Event is published; Ready stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane binaries (tests/cluster/build)"]
async fn time_wait_at_the_cap_warns() -> Result<()> {
    let Some(env) = setup("time_wait_at_the_cap_warns").await? else {
        return Ok(());
    };
    env.apply(
        &profile("caching-proxy")
            .role("web")
            .sysctls(&[("net.ipv4.tcp_max_tw_buckets", "50")])
            .build(),
    )
    .await?;
    env.wait_sysctl(NODE, "net.ipv4.tcp_max_tw_buckets", "50")
        .await?;
    env.wait_profile("caching-proxy", "Ready, no pressure yet", |p| {
        is_current(p)
            && condition_full(p, "Ready").is_some_and(|c| c.0 == "True")
            && condition_full(p, "TimeWaitPressure").is_some_and(|c| c.0 == "False")
    })
    .await?;

    let _load = SocketLoad::start(env.node(NODE), 0, 80).await?;
    // The load closes one connection every 50 ms: wait until all 30 past the cap overflowed.
    let s = env
        .wait_report(NODE, "TimeWaitPressure and 30 overflows", |s| {
            report_condition(s, "TimeWaitPressure").is_some_and(|c| c.0 == "True")
                && s.sockstat.time_wait_overflows.unwrap_or_default() >= 30
        })
        .await?;
    assert_eq!(
        (s.sockstat.time_wait, s.sockstat.max_tw_buckets),
        (50, 50),
        "TIME_WAIT stops at the cap"
    );
    // Held for five minutes after the last overflow, so still said with the final figures.
    assert!(
        s.warnings.iter().any(|w| w.contains("TCPTimeWaitOverflow")),
        "{:?}",
        s.warnings
    );
    let p = env
        .wait_profile("caching-proxy", "TimeWaitPressure on node-a", |p| {
            condition_full(p, "TimeWaitPressure").is_some_and(|c| c.0 == "True")
        })
        .await?;
    let (_, _, msg) = condition_full(&p, "TimeWaitPressure").context("condition")?;
    assert!(msg.contains("node-a"), "{msg}");
    assert_eq!(
        condition_full(&p, "Ready").map(|c| c.0).as_deref(),
        Some("True"),
        "a warning, not a failure"
    );
    env.wait_event("caching-proxy", "Warning TimeWaitPressure")
        .await?;
    Ok(())
}

/// Item 16: quiet failures speak. A selector matching no node gets a message naming it and a
/// Warning Event; a misspelled key suggests the nearest key the node has; once the last
/// profile is gone and the agent withdrawn, the report no longer shows frozen TCP counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane binaries (tests/cluster/build)"]
async fn quiet_failures_speak() -> Result<()> {
    let Some(env) = setup("quiet_failures_speak").await? else {
        return Ok(());
    };
    env.apply(
        &profile("typo-selector")
            .role("wbe")
            .sysctls(&[("net.ipv4.tcp_fin_timeout", "33")])
            .build(),
    )
    .await?;
    let p = env
        .wait_profile("typo-selector", "NoMatchingNodes", |p| {
            is_current(p) && condition_full(p, "Ready").is_some_and(|c| c.1 == "NoMatchingNodes")
        })
        .await?;
    let (_, _, msg) = condition_full(&p, "Ready").context("Ready")?;
    assert!(msg.contains("node.example.com/role=wbe"), "{msg}");
    env.wait_event("typo-selector", "Warning NoMatchingNodes")
        .await?;

    env.apply(
        &profile("typo-key")
            .role("web")
            .sysctls(&[("net.ipv4.tcp_fin_timeot", "33")])
            .build(),
    )
    .await?;
    let s = env
        .wait_report(NODE, "the misspelled key Unsupported", |s| {
            profile_entry(s, "net.ipv4.tcp_fin_timeot", "typo-key")
                .is_some_and(|e| e.state == KeyState::Unsupported)
        })
        .await?;
    let msg = profile_entry(&s, "net.ipv4.tcp_fin_timeot", "typo-key")
        .and_then(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("did you mean `net.ipv4.tcp_fin_timeout`?"),
        "{msg}"
    );

    // Sockets on the node, counted in the report while the agent runs.
    let _load = SocketLoad::start(env.node(NODE), 2, 3).await?;
    env.wait_report(NODE, "TCP counts", |s| {
        s.tcp.total.get("ESTABLISHED").copied().unwrap_or_default() >= 4
    })
    .await?;
    for name in ["typo-key", "typo-selector"] {
        env.delete_profile(name).await?;
    }
    let s = env
        .wait_report(NODE, "withdrawn, TCP counts cleared", |s| {
            report_condition(s, "Ready").is_some_and(|c| c.1 == "AgentWithdrawn")
        })
        .await?;
    assert!(s.tcp.total.values().all(|n| *n == 0), "{:?}", s.tcp);
    assert!(s.profiles.is_empty());
    Ok(())
}

/// Item 12 on a real kubelet: the chart installed by helm, one kubelet node (the test kubelet
/// syncs pods every 10 s), the agent's interval ten minutes. `helm upgrade` adding a
/// `deniedKeys` entry reaches the running agent (same pod, no restart) through the kubelet's
/// ConfigMap volume update and the agent's 2 s file check; the time taken is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, the control plane and the kubelet-node components (tests/cluster/build)"]
async fn policy_change_reaches_the_agent_on_a_kubelet_node() -> Result<()> {
    let test = "policy_change_reaches_the_agent_on_a_kubelet_node";
    let Some((cluster, _state_dir)) = support::kubelet::kubelet_cluster(test).await? else {
        return Ok(());
    };
    if let Err(e) = kubelet_policy_scenario(&cluster).await {
        // A panic (not an Err) so the cluster's drop prints its diagnostics.
        panic!("{test} failed: {e:#}");
    }
    Ok(())
}

const RUNTIME: &str = "nodetune.test/runtime";
/// The test kubelet syncs pods every 10 s and pulls nothing: slower than the shim.
const KUBELET_WAIT: Duration = Duration::from_secs(180);

async fn kubelet_policy_scenario(cluster: &Cluster) -> Result<()> {
    let values = chart_installed_on_a_kubelet_node(cluster).await?;
    base_profile_applies_on_the_kubelet_node(cluster).await?;
    let before = agent_uids(cluster).await?;
    let denied = cluster.dir().join("edges-denied.yaml");
    std::fs::write(
        &denied,
        "policy: {allowedScopes: [NetworkNamespace], deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']}\n",
    )?;
    let started = std::time::Instant::now();
    helm_upgrade(cluster, &values, &denied, "helm upgrade").await?;
    wait_for(
        "base Denied after helm upgrade",
        KUBELET_WAIT,
        POLL,
        || async { Ok((base_state(cluster).await? == Some(KeyState::Denied)).then_some(())) },
    )
    .await?;
    eprintln!(
        "policy change reached the agent {:?} after helm upgrade returned",
        started.elapsed()
    );
    anyhow::ensure!(
        agent_uids(cluster).await? == before,
        "the agent pod was replaced: the change must reach the running agent"
    );

    // Leave this machine's shared state directory as found: the key allowed again (a restore
    // is checked against the policy too), then the profile goes and the original comes back.
    std::fs::write(&denied, "policy: {allowedScopes: [NetworkNamespace]}\n")?;
    helm_upgrade(cluster, &values, &denied, "helm upgrade back").await?;
    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    profiles.delete("base", &Default::default()).await?;
    wait_for("base gone", KUBELET_WAIT, POLL, || async {
        Ok(profiles.get_opt("base").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

/// The image built and imported on a kubelet node `node-a`, the chart installed with the
/// agent's interval at ten minutes; returns the values file an upgrade must repeat.
async fn chart_installed_on_a_kubelet_node(cluster: &Cluster) -> Result<String> {
    let image = support::kubelet::nodetune_image(
        env!("CARGO_BIN_EXE_nodetune").as_ref(),
        &cluster.dir().join("image"),
    )
    .await?;
    cluster
        .add_kubelet_node(NODE, &[(ROLE, "web"), (RUNTIME, "kubelet")])
        .await?;
    cluster.import_image(NODE, &[&image.archive]).await?;
    let (repository, tag) = image.tag.rsplit_once(':').context("image tag")?;
    let values = cluster.dir().join("edges-values.yaml");
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: '{tag}', pullPolicy: Never}}\n\
             controller: {{replicas: 1, nodeSelector: {{{RUNTIME}: kubelet}}}}\n\
             agent: {{interval: 600s, heartbeat: 4s}}\n"
        ),
    )?;
    let values = values.to_str().context("values path")?.to_string();
    support::helm_install_demo(cluster, &["-f", &values]).await?;
    Ok(values)
}

/// The base profile applied: its key Applied in node-a's report and set in its kernel.
async fn base_profile_applies_on_the_kubelet_node(cluster: &Cluster) -> Result<()> {
    let p = base();
    support::e2e::apply_profile(cluster, &p).await?;
    wait_for("base Applied on node-a", KUBELET_WAIT, POLL, || async {
        Ok((base_state(cluster).await? == Some(KeyState::Applied)).then_some(()))
    })
    .await?;
    let node = cluster.kubelet_node(NODE).context("the kubelet node")?;
    let fin = node.exec_ok(&["sysctl", "-n", FIN]).await?;
    anyhow::ensure!(fin.trim() == "33", "{FIN} is {fin:?}");
    Ok(())
}

/// The state of the base profile's key in node-a's report.
async fn base_state(cluster: &Cluster) -> Result<Option<KeyState>> {
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let s = reports.get_opt(NODE).await?.and_then(|r| r.status);
    Ok(s.and_then(|s| profile_entry(&s, FIN, "base").map(|e| e.state)))
}

async fn agent_uids(cluster: &Cluster) -> Result<Vec<String>> {
    let pods = Api::<Pod>::namespaced(cluster.client(), NS)
        .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
        .await?;
    Ok(pods.items.iter().filter_map(|p| p.uid()).collect())
}

/// `helm upgrade` with the demo values, the test's `values` and `policy` on top.
async fn helm_upgrade(
    cluster: &Cluster,
    values: &str,
    policy: &std::path::Path,
    what: &str,
) -> Result<()> {
    let mut upgrade = cluster.helm();
    upgrade
        .current_dir(support::repo_root())
        .args(["upgrade", "nodetune", "charts/nodetune", "--namespace", NS])
        .args(["-f", "charts/nodetune/ci/demo-values.yaml", "-f", values])
        .args(["-f", policy.to_str().context("path")?]);
    support::run(&mut upgrade, what).await?;
    Ok(())
}
