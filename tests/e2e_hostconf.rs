//! Issue 19, boot-time configuration, on the simulated-node cluster: a node whose root holds a
//! sysctl.d file setting a profile key to another value gets it in its NodeTuningReport (file,
//! line, boot value) with `HostConfigDiffers` True, through the DaemonSet's read-only host
//! mount (the node shim maps the hostPath `/` to the node's root directory, a fake host root).
//!
//! Persistence and the startup taint run on the same tier: the agent's sysctl.d file appears
//! in the node's root directory with the profile's values, follows an edit and goes with the
//! profile; nodes registered with `nodetune.dev/untuned:NoSchedule` lose it after their agent's
//! first verified pass, when a key is Unsupported, and (by the controller) when no profile
//! selects them.
//!
//! Needs root and the control plane of tests/cluster/build; `#[ignore]`d like every cluster
//! test: `cargo test --test e2e_hostconf -- --ignored --nocapture`.
mod support;

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use nodetune::api::{NodeTuningProfile, NodeTuningReport};
use nodetune::sysctl::hostconf::HostConfigDiff;
use support::e2e::{POLL, WAIT};
use support::fixtures::ROLE;
use support::{Cluster, wait_for};

const WEB: &str = "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata:
  name: web-fin
spec:
  nodeSelector:
    matchLabels:
      node.example.com/role: web
  sysctls:
    net.ipv4.tcp_fin_timeout: \"30\"
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn host_sysctl_d_difference_is_reported_with_file_and_line() -> Result<()> {
    let Some(bin) =
        support::cluster_prereqs("host_sysctl_d_difference_is_reported_with_file_and_line")
    else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    let node = cluster.add_node("node-a", &[(ROLE, "web")]).await?;
    let conf = node.root.join("etc/sysctl.d");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("10-net.conf"),
        "# the admin's boot value\nnet.ipv4.tcp_fin_timeout = 15\n",
    )?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(&cluster, &deploy).await?;

    let p: NodeTuningProfile = serde_yaml::from_str(WEB)?;
    support::e2e::apply_profile(&cluster, &p).await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let status = wait_for(
        "node-a reports the boot-time difference",
        WAIT,
        POLL,
        || async {
            let r = reports.get_opt("node-a").await?;
            Ok(r.and_then(|r| r.status)
                .filter(|s| !s.host_config.is_empty()))
        },
    )
    .await?;
    assert_eq!(
        status.host_config[0],
        HostConfigDiff {
            key: "net.ipv4.tcp_fin_timeout".into(),
            desired: "30".into(),
            boot_value: "15".into(),
            file: "/etc/sysctl.d/10-net.conf".into(),
            line: 2,
            glob: None,
        }
    );
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "HostConfigDiffers")
        .expect("HostConfigDiffers");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "BootValuesDiffer")
    );
    assert!(
        status.boot_id.as_deref().is_some_and(|b| b.len() == 36),
        "{:?}",
        status.boot_id
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "a difference is no failure: {:?}",
        status.conditions
    );
    Ok(())
}

const TAINT: &str = "nodetune.dev/untuned";

/// Applies a profile from YAML (server-side apply, forced).
async fn apply_profile(cluster: &support::Cluster, yaml: &str) -> Result<()> {
    let p: NodeTuningProfile = serde_yaml::from_str(yaml)?;
    let name = p.metadata.name.clone().unwrap_or_default();
    Api::<NodeTuningProfile>::all(cluster.client())
        .patch(
            &name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&p),
        )
        .await?;
    Ok(())
}

fn persisting(value: &str) -> String {
    format!(
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata:
  name: web-persist
spec:
  persist: true
  nodeSelector:
    matchLabels:
      node.example.com/role: web
  sysctls:
    net.ipv4.tcp_fin_timeout: \"{value}\"
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn persisted_keys_land_in_the_nodes_sysctl_d_follow_edits_and_go_with_the_profile()
-> Result<()> {
    let Some(bin) = support::cluster_prereqs(
        "persisted_keys_land_in_the_nodes_sysctl_d_follow_edits_and_go_with_the_profile",
    ) else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    let node = cluster.add_node("node-a", &[(ROLE, "web")]).await?;
    std::fs::create_dir_all(node.root.join("etc/sysctl.d"))?;
    let file = node.root.join("etc/sysctl.d/99-zz-nodetune.conf");
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::set_env(
        support::deploy::controller_container(&mut deploy)?,
        &[("NODETUNE_AGENT_PERSIST", "true")],
    );
    support::deploy::create_controller(&cluster, &deploy).await?;

    let has = |want: &'static str| {
        let file = file.clone();
        move || {
            let file = file.clone();
            async move {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                Ok(text.contains(want).then_some(text))
            }
        }
    };
    apply_profile(&cluster, &persisting("30")).await?;
    wait_for(
        "the file with 30",
        WAIT,
        POLL,
        has("-net.ipv4.tcp_fin_timeout = 30\n"),
    )
    .await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    wait_for("the report lists the persisted key", WAIT, POLL, || async {
        let s = reports.get_opt("node-a").await?.and_then(|r| r.status);
        Ok(s.filter(|s| s.persisted == ["net.ipv4.tcp_fin_timeout"]))
    })
    .await?;

    apply_profile(&cluster, &persisting("25")).await?;
    wait_for(
        "the file follows the edit",
        WAIT,
        POLL,
        has("-net.ipv4.tcp_fin_timeout = 25\n"),
    )
    .await?;

    Api::<NodeTuningProfile>::all(cluster.client())
        .delete("web-persist", &DeleteParams::default())
        .await?;
    wait_for("the file goes with the profile", WAIT, POLL, || async {
        Ok((!file.exists()).then_some(()))
    })
    .await?;
    Ok(())
}

/// Adds the startup taint to a node, as `--register-with-taints` would have.
async fn taint(cluster: &support::Cluster, node: &str) -> Result<()> {
    let patch = serde_json::json!({
        "spec": { "taints": [
            { "key": "example.com/keep", "effect": "NoSchedule" },
            { "key": TAINT, "effect": "NoSchedule" },
        ] }
    });
    Api::<Node>::all(cluster.client())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn taint_keys(nodes: &Api<Node>, name: &str) -> Result<Vec<String>> {
    let n = nodes.get(name).await?;
    Ok(n.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn the_startup_taint_goes_after_a_verified_pass_an_unsupported_key_or_no_profile()
-> Result<()> {
    let Some(bin) = support::cluster_prereqs(
        "the_startup_taint_goes_after_a_verified_pass_an_unsupported_key_or_no_profile",
    ) else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    cluster.add_node("node-web", &[(ROLE, "web")]).await?;
    cluster.add_node("node-old", &[(ROLE, "old")]).await?;
    cluster.add_node("node-none", &[(ROLE, "none")]).await?;
    // Untainted: somewhere for the controller's pod to run.
    cluster.add_node("node-ctl", &[(ROLE, "ctl")]).await?;
    for n in ["node-web", "node-old", "node-none"] {
        taint(&cluster, n).await?;
    }
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(&cluster, &deploy).await?;
    apply_profile(&cluster, WEB).await?;
    apply_profile(
        &cluster,
        "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata:
  name: old-kernel
spec:
  nodeSelector:
    matchLabels:
      node.example.com/role: old
  sysctls:
    net.ipv4.tcp_tw_recycle: \"1\"
",
    )
    .await?;

    let nodes: Api<Node> = Api::all(cluster.client());
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    for name in ["node-web", "node-old", "node-none"] {
        let kept = wait_for(
            &format!("{name} loses the startup taint"),
            WAIT,
            POLL,
            || async {
                let keys = taint_keys(&nodes, name).await?;
                if keys.iter().any(|k| k == TAINT) {
                    // The report's warnings are the observation a timeout shows.
                    let s = reports.get_opt(name).await?.and_then(|r| r.status);
                    anyhow::bail!(
                        "taints {keys:?}; report warnings {:?}",
                        s.map(|s| s.warnings)
                    );
                }
                Ok(Some(keys))
            },
        )
        .await
        .inspect_err(|_| eprintln!("{}", cluster.diagnostics()))?;
        assert_eq!(kept, ["example.com/keep"], "{name}: only ours goes");
    }
    let web = reports.get("node-web").await?.status.unwrap_or_default();
    assert!(
        web.startup_taint
            .as_deref()
            .is_some_and(|s| s.contains("verified pass")),
        "{:?} {:?}",
        web.startup_taint,
        web.sysctls
    );
    assert!(
        reports.get_opt("node-none").await?.is_none(),
        "no agent ran on node-none: the controller took the taint off"
    );
    agent_may_only_take_the_startup_taint_off_its_own_node(&cluster).await?;
    let old = reports.get("node-old").await?.status.unwrap_or_default();
    assert!(
        old.startup_taint
            .as_deref()
            .is_some_and(|s| s.contains("net.ipv4.tcp_tw_recycle (Unsupported)")),
        "{:?}",
        old.startup_taint
    );
    Ok(())
}

/// Least privilege: node-web's agent, with its own pod-bound token, may not touch another
/// node's taints nor its own node's labels (admission policy nodetune-agent-own-node-taint).
async fn agent_may_only_take_the_startup_taint_off_its_own_node(
    cluster: &support::Cluster,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    let ns = support::deploy::NAMESPACE;
    let pods = Api::<Pod>::namespaced(cluster.client(), ns)
        .list(&kube::api::ListParams::default().fields("spec.nodeName=node-web"))
        .await?;
    let agent = pods
        .items
        .iter()
        .find(|p| p.name_any().starts_with("nodetune-agent"))
        .map(|p| p.name_any())
        .ok_or_else(|| anyhow::anyhow!("no agent pod on node-web"))?;
    let kubeconfig = cluster
        .with_shim(|s| {
            s.pod_records(ns, &agent)
                .last()
                .and_then(|r| r.kubeconfig.clone())
        })
        .ok_or_else(|| anyhow::anyhow!("the agent's kubeconfig"))?;
    let as_agent = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(cluster.bin("kubectl"));
        cmd.env("KUBECONFIG", &kubeconfig).args(args);
        cmd
    };
    // The API server loads a new admission policy within about a second of its creation; the
    // agents can be quicker than that on a fresh install. Wait until the policy is in force
    // (a server-side dry run goes through admission and changes nothing), then check it.
    wait_for("the agent-taint policy is in force", WAIT, POLL, || async {
        let probe = as_agent(&[
            "patch",
            "node",
            "node-old",
            "--type=merge",
            "--dry-run=server",
            "-p",
            r#"{"spec":{"taints":null}}"#,
        ])
        .output()
        .await?;
        Ok((!probe.status.success()).then_some(()))
    })
    .await?;
    for (node, patch, refusal) in [
        (
            "node-old",
            r#"{"spec":{"taints":null}}"#,
            "may only change its own Node",
        ),
        (
            "node-web",
            r#"{"metadata":{"labels":{"forged":"yes"}}}"#,
            "may not change a Node's labels",
        ),
        (
            "node-web",
            r#"{"spec":{"taints":null}}"#,
            "may only remove the taint nodetune.dev/untuned",
        ),
    ] {
        let out = as_agent(&["patch", "node", node, "--type=merge", "-p", patch])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(refusal),
            "{node} {patch}: exit {:?}, stdout {:?}, stderr {stderr}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Reads one un-labelled figure from the agent's /metrics.
async fn agent_metric(node: &support::SimNode, name: &str) -> Result<u64> {
    let text = support::http_get(&format!("{}:9477", node.ip), "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))
}

/// A second writer sets the key back every second: after the threshold (5 corrections within
/// the hour) the key is Contested with the foreign value, and the agent leaves it alone for a
/// while: passes that skip a correction are counted and outnumber the corrections written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn a_key_another_writer_resets_every_second_becomes_contested_and_backs_off() -> Result<()> {
    let Some(bin) = support::cluster_prereqs(
        "a_key_another_writer_resets_every_second_becomes_contested_and_backs_off",
    ) else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    let node = cluster.add_node("node-a", &[(ROLE, "web")]).await?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(&cluster, &deploy).await?;
    apply_profile(&cluster, WEB).await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    wait_for("the key applied", WAIT, POLL, || async {
        let s = reports.get_opt("node-a").await?.and_then(|r| r.status);
        Ok(s.filter(|s| s.summary.applied == 1))
    })
    .await?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, node) = (stop.clone(), node.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = node
                    .exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_fin_timeout=61"])
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let contested = wait_for("the key contested", WAIT, POLL, || async {
        let s = reports.get_opt("node-a").await?.and_then(|r| r.status);
        Ok(s.and_then(|s| s.contested.into_iter().next()))
    })
    .await;
    let slowed = wait_for(
        "held passes outnumber the corrections",
        WAIT,
        POLL,
        || async {
            let holds = agent_metric(&node, "nodetune_agent_contest_holds_total").await?;
            let drift = agent_metric(&node, "nodetune_agent_drift_corrections_total").await?;
            Ok((holds > drift).then_some((holds, drift)))
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await?;
    let c = contested?;
    assert_eq!(
        (
            c.key.as_str(),
            c.foreign_value.as_str(),
            c.profile.as_deref()
        ),
        ("net.ipv4.tcp_fin_timeout", "61", Some("web-fin"))
    );
    let (holds, drift) = slowed?;
    eprintln!("contested: {drift} corrections written, {holds} passes held off");
    let p = Api::<NodeTuningProfile>::all(cluster.client());
    wait_for("the profile counts the node", WAIT, POLL, || async {
        let s = p.get("web-fin").await?.status;
        Ok(s.filter(|s| s.contested_nodes == 1))
    })
    .await?;
    Ok(())
}
