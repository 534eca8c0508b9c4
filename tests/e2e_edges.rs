//! Sharp edges of issue 17 on a real control plane (items 11, 12, 13 and 16): the controller
//! and the agents run as shipped in deploy/nodetune.yaml, the agents through the node shim on
//! simulated nodes (network namespaces); sysctls are read with `sysctl -n` inside them.
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReport, NodeTuningReportStatus};
use support::sockets::SocketLoad;
use support::{Cluster, SimNode, kubectl, wait_for};

const NS: &str = "nodetune-system";
const ROLE: &str = "node.example.com/role";
const FIN: &str = "net.ipv4.tcp_fin_timeout";
/// Generous: the machine is small and shared; a pass normally takes a few seconds.
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(500);

/// One simulated node (`node-a`, role web), the shim, and nodetune as shipped with short
/// agent intervals; `agent_interval` overrides the agent's pass interval.
struct Env {
    cluster: Cluster,
    node: SimNode,
}

async fn setup(test: &str, agent_interval: Option<&str>) -> Result<Option<Env>> {
    let Some(bin) = support::cluster_prereqs(test) else {
        return Ok(None);
    };
    let cluster = Cluster::start(&bin).await?;
    let node = cluster.add_node("node-a", &[(ROLE, "web")]).await?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    if let Some(interval) = agent_interval {
        support::deploy::set_env(
            support::deploy::controller_container(&mut deploy)?,
            &[("NODETUNE_AGENT_INTERVAL", interval)],
        );
    }
    support::deploy::create_controller(&cluster, &deploy).await?;
    Ok(Some(Env { cluster, node }))
}

impl Env {
    fn profiles(&self) -> Api<NodeTuningProfile> {
        Api::all(self.cluster.client())
    }

    fn reports(&self) -> Api<NodeTuningReport> {
        Api::all(self.cluster.client())
    }

    async fn apply_profile(&self, yaml: &str) -> Result<()> {
        let p: NodeTuningProfile = serde_yaml::from_str(yaml)?;
        self.profiles()
            .patch(
                &p.name_any(),
                &PatchParams::apply("e2e-edges").force(),
                &Patch::Apply(&p),
            )
            .await?;
        Ok(())
    }

    async fn sysctl(&self, key: &str) -> Result<String> {
        Ok(self
            .node
            .exec_ok(&["sysctl", "-n", key])
            .await?
            .trim()
            .to_string())
    }

    async fn wait_sysctl(&self, key: &str, want: &str) -> Result<()> {
        wait_for(&format!("{key}={want} on node-a"), WAIT, POLL, || async {
            Ok((self.sysctl(key).await? == want).then_some(()))
        })
        .await
        .map_err(|e| self.fail(e))
    }

    async fn wait_profile<F>(&self, name: &str, what: &str, check: F) -> Result<NodeTuningProfile>
    where
        F: Fn(&NodeTuningProfile) -> bool,
    {
        wait_for(&format!("profile {name}: {what}"), WAIT, POLL, || async {
            let p = self.profiles().get(name).await?;
            Ok(check(&p).then_some(p))
        })
        .await
        .map_err(|e| self.fail(e))
    }

    async fn wait_report<F>(&self, what: &str, check: F) -> Result<NodeTuningReportStatus>
    where
        F: Fn(&NodeTuningReportStatus) -> bool,
    {
        wait_for(&format!("report node-a: {what}"), WAIT, POLL, || async {
            let s = self
                .reports()
                .get_opt("node-a")
                .await?
                .and_then(|r| r.status);
            Ok(s.filter(|s| check(s)))
        })
        .await
        .map_err(|e| self.fail(e))
    }

    /// `type reason` of the Events about an object, one per line.
    async fn events(&self, name: &str) -> Result<String> {
        let selector = format!("involvedObject.name={name}");
        kubectl(
            &self.cluster,
            &[
                "get",
                "events",
                "-A",
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
            ],
        )
        .await
    }

    async fn wait_event(&self, name: &str, want: &str) -> Result<()> {
        wait_for(&format!("event {want:?} on {name}"), WAIT, POLL, || async {
            Ok(self
                .events(name)
                .await?
                .lines()
                .any(|l| l == want)
                .then_some(()))
        })
        .await
        .map_err(|e| self.fail(e))
    }

    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("diagnostics:\n{}", self.cluster.diagnostics()))
    }
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn profile_condition(p: &NodeTuningProfile, type_: &str) -> Option<(String, String, String)> {
    let s = p.status.as_ref()?;
    condition(&s.conditions, type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn current(p: &NodeTuningProfile) -> bool {
    p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
}

fn entry<'a>(
    s: &'a NodeTuningReportStatus,
    key: &str,
    profile: &str,
) -> Option<&'a nodetune::api::SysctlEntry> {
    s.sysctls
        .iter()
        .find(|e| e.key == key && e.profile.as_deref() == Some(profile))
}

const BASE: &str = "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: base}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  sysctls:
    net.ipv4.tcp_fin_timeout: \"33\"
";

/// Item 11: a higher-priority DryRun profile on the same key used to make the Enforce
/// profile's entry `Overridden`: the key was neither enforced nor corrected on drift. Now the
/// enforced value holds (drift corrected), and the preview is reported as DryRun on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane binaries (tests/cluster/build)"]
async fn dry_run_preview_keeps_enforcement() -> Result<()> {
    let Some(env) = setup("dry_run_preview_keeps_enforcement", None).await? else {
        return Ok(());
    };
    env.apply_profile(BASE).await?;
    env.apply_profile(
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: preview}
spec:
  mode: DryRun
  priority: 100
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  sysctls:
    net.ipv4.tcp_fin_timeout: \"22\"
",
    )
    .await?;
    env.wait_sysctl(FIN, "33").await?;
    let s = env
        .wait_report("base Applied, preview DryRun", |s| {
            entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Applied)
                && entry(s, FIN, "preview").is_some_and(|e| e.state == KeyState::DryRun)
        })
        .await?;
    let preview = entry(&s, FIN, "preview").context("preview entry")?;
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
    env.node
        .exec_ok(&["sysctl", "-w", "net.ipv4.tcp_fin_timeout=2"])
        .await?;
    env.wait_sysctl(FIN, "33").await?;
    env.wait_report("a drift correction counted", |s| s.drift_corrections >= 1)
        .await?;
    for name in ["base", "preview"] {
        let p = env
            .wait_profile(name, "Ready, not Conflicted", |p| {
                current(p)
                    && profile_condition(p, "Ready").is_some_and(|c| c.0 == "True")
                    && profile_condition(p, "Conflicted").is_some_and(|c| c.0 == "False")
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
    let Some(env) = setup("policy_change_reaches_the_agent", Some("600s")).await? else {
        return Ok(());
    };
    env.apply_profile(BASE).await?;
    env.wait_sysctl(FIN, "33").await?;
    env.wait_report("the key Applied", |s| {
        entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Applied)
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
        .wait_report("the key Denied by the new policy", |s| {
            entry(s, FIN, "base").is_some_and(|e| e.state == KeyState::Denied)
        })
        .await?;
    let msg = entry(&s, FIN, "base")
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
    let Some(env) = setup("time_wait_at_the_cap_warns", None).await? else {
        return Ok(());
    };
    env.apply_profile(
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: caching-proxy}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  sysctls:
    net.ipv4.tcp_max_tw_buckets: \"50\"
",
    )
    .await?;
    env.wait_sysctl("net.ipv4.tcp_max_tw_buckets", "50").await?;
    env.wait_profile("caching-proxy", "Ready, no pressure yet", |p| {
        current(p)
            && profile_condition(p, "Ready").is_some_and(|c| c.0 == "True")
            && profile_condition(p, "TimeWaitPressure").is_some_and(|c| c.0 == "False")
    })
    .await?;

    let _load = SocketLoad::start(&env.node, 0, 80).await?;
    // The load closes one connection every 50 ms: wait until all 30 past the cap overflowed.
    let s = env
        .wait_report("TimeWaitPressure and 30 overflows", |s| {
            condition(&s.conditions, "TimeWaitPressure").is_some_and(|c| c.status == "True")
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
            profile_condition(p, "TimeWaitPressure").is_some_and(|c| c.0 == "True")
        })
        .await?;
    let (_, _, msg) = profile_condition(&p, "TimeWaitPressure").context("condition")?;
    assert!(msg.contains("node-a"), "{msg}");
    assert_eq!(
        profile_condition(&p, "Ready").map(|c| c.0).as_deref(),
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
    let Some(env) = setup("quiet_failures_speak", None).await? else {
        return Ok(());
    };
    env.apply_profile(
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: typo-selector}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: wbe}}
  sysctls:
    net.ipv4.tcp_fin_timeout: \"33\"
",
    )
    .await?;
    let p = env
        .wait_profile("typo-selector", "NoMatchingNodes", |p| {
            current(p) && profile_condition(p, "Ready").is_some_and(|c| c.1 == "NoMatchingNodes")
        })
        .await?;
    let (_, _, msg) = profile_condition(&p, "Ready").context("Ready")?;
    assert!(msg.contains("node.example.com/role=wbe"), "{msg}");
    env.wait_event("typo-selector", "Warning NoMatchingNodes")
        .await?;

    env.apply_profile(
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: typo-key}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  sysctls:
    net.ipv4.tcp_fin_timeot: \"33\"
",
    )
    .await?;
    let s = env
        .wait_report("the misspelled key Unsupported", |s| {
            entry(s, "net.ipv4.tcp_fin_timeot", "typo-key")
                .is_some_and(|e| e.state == KeyState::Unsupported)
        })
        .await?;
    let msg = entry(&s, "net.ipv4.tcp_fin_timeot", "typo-key")
        .and_then(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("did you mean `net.ipv4.tcp_fin_timeout`?"),
        "{msg}"
    );

    // Sockets on the node, counted in the report while the agent runs.
    let _load = SocketLoad::start(&env.node, 2, 3).await?;
    env.wait_report("TCP counts", |s| {
        s.tcp.total.get("ESTABLISHED").copied().unwrap_or_default() >= 4
    })
    .await?;
    for name in ["typo-key", "typo-selector"] {
        env.profiles()
            .delete(name, &DeleteParams::default())
            .await?;
    }
    let s = env
        .wait_report("withdrawn, TCP counts cleared", |s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.reason == "AgentWithdrawn")
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
    let Some((bin, _node_bin)) = support::kubelet_prereqs(test) else {
        return Ok(());
    };
    let _state_dir = RemoveIfNew::new(nodetune::controller::render::STATE_DIR);
    let cluster = Cluster::start(&bin).await?;
    if let Err(e) = kubelet_policy_scenario(&cluster).await {
        // A panic (not an Err) so the cluster's drop prints its diagnostics.
        panic!("{test} failed: {e:#}");
    }
    Ok(())
}

async fn kubelet_policy_scenario(cluster: &Cluster) -> Result<()> {
    const RUNTIME: &str = "nodetune.test/runtime";
    const KUBELET_WAIT: Duration = Duration::from_secs(180);
    let image = support::kubelet::nodetune_image(
        env!("CARGO_BIN_EXE_nodetune").as_ref(),
        &cluster.dir().join("image"),
    )
    .await?;
    let node = cluster
        .add_kubelet_node("node-a", &[(ROLE, "web"), (RUNTIME, "kubelet")])
        .await?;
    cluster.import_image("node-a", &[&image.archive]).await?;
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

    let profiles: Api<NodeTuningProfile> = Api::all(cluster.client());
    let p: NodeTuningProfile = serde_yaml::from_str(BASE)?;
    profiles
        .patch(
            "base",
            &PatchParams::apply("e2e-edges").force(),
            &Patch::Apply(&p),
        )
        .await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let state_of = || async {
        let s = reports.get_opt("node-a").await?.and_then(|r| r.status);
        anyhow::Ok(s.and_then(|s| entry(&s, FIN, "base").map(|e| e.state)))
    };
    wait_for("base Applied on node-a", KUBELET_WAIT, POLL, || async {
        Ok((state_of().await? == Some(KeyState::Applied)).then_some(()))
    })
    .await?;
    let fin = node.exec_ok(&["sysctl", "-n", FIN]).await?;
    anyhow::ensure!(fin.trim() == "33", "{FIN} is {fin:?}");
    let agent_uid = || async {
        let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client(), NS)
            .list(&kube::api::ListParams::default().labels("app.kubernetes.io/component=agent"))
            .await?;
        anyhow::Ok(
            pods.items
                .iter()
                .filter_map(|p| p.uid())
                .collect::<Vec<_>>(),
        )
    };
    let before = agent_uid().await?;

    let denied = cluster.dir().join("edges-denied.yaml");
    std::fs::write(
        &denied,
        "policy: {allowedScopes: [NetworkNamespace], deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']}\n",
    )?;
    let started = std::time::Instant::now();
    let mut upgrade = cluster.helm();
    upgrade
        .current_dir(support::repo_root())
        .args(["upgrade", "nodetune", "charts/nodetune", "--namespace", NS])
        .args(["-f", "charts/nodetune/ci/demo-values.yaml", "-f", &values])
        .args(["-f", denied.to_str().context("path")?]);
    support::run(&mut upgrade, "helm upgrade").await?;
    wait_for(
        "base Denied after helm upgrade",
        KUBELET_WAIT,
        POLL,
        || async { Ok((state_of().await? == Some(KeyState::Denied)).then_some(())) },
    )
    .await?;
    eprintln!(
        "policy change reached the agent {:?} after helm upgrade returned",
        started.elapsed()
    );
    anyhow::ensure!(
        agent_uid().await? == before,
        "the agent pod was replaced: the change must reach the running agent"
    );

    // Leave this machine's shared state directory as found: the key allowed again (a restore
    // is checked against the policy too), then the profile goes and the original comes back.
    std::fs::write(&denied, "policy: {allowedScopes: [NetworkNamespace]}\n")?;
    support::run(&mut upgrade, "helm upgrade back").await?;
    profiles.delete("base", &DeleteParams::default()).await?;
    wait_for("base gone", KUBELET_WAIT, POLL, || async {
        Ok(profiles.get_opt("base").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

/// A directory removed on drop unless it existed before (the agents' hostPath state directory
/// is this machine's own path on kubelet nodes).
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
