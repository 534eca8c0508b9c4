//! The chart on a real control plane with real agents (run by the node shim): `helm install`
//! with the demo policy, admission refusing a key outside it, a profile applied, `helm upgrade`
//! from a previous image version (agents roll, nothing is restored, status converges), and
//! `helm uninstall`, after which nodes have their original values, no agent label and no
//! nodetune objects are left (the CRDs stay: crds.keep).
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReport};
use serde_json::json;
use support::{Cluster, run, wait_for};

const NS: &str = "nodetune-system";
const ROLE: &str = "node.example.com/role";
const AGENT_LABEL: &str = "nodetune.dev/agent";
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(500);

fn helm(cluster: &Cluster, args: &[&str]) -> tokio::process::Command {
    let mut cmd = cluster.helm();
    cmd.current_dir(support::repo_root()).args(args);
    cmd
}

async fn sysctl(cluster: &Cluster, node: &str, key: &str) -> Result<String> {
    let n = cluster.node(node).context("node")?;
    let out = n.exec_ok(&["sysctl", "-n", key]).await?;
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

async fn wait_sysctl(cluster: &Cluster, node: &str, key: &str, want: &str) -> Result<()> {
    wait_for(&format!("{key}={want} on {node}"), WAIT, POLL, || async {
        Ok((sysctl(cluster, node, key).await? == want).then_some(()))
    })
    .await
}

fn ready_and_current(p: &NodeTuningProfile) -> bool {
    let Some(s) = p.status.as_ref() else {
        return false;
    };
    s.observed_generation == p.metadata.generation
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `curl` inside the node's network namespace: the HTTP status, `000` when nothing answered.
async fn curl_on_node(node: &support::SimNode, url: &str) -> Result<String> {
    let out = node
        .exec(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "20",
            "-w",
            "%{http_code}",
            url,
        ])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Issue 17, item 3, on a running agent installed by the chart: the metrics port listens on
/// the node's address only (`agent.metricsBindAddress: hostIP`), and a flood of connections
/// from elsewhere (this process, outside the node) is turned away with 503s while the node's
/// own probe is still answered.
async fn metrics_port_holds_under_a_flood(cluster: &Cluster, name: &str) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let node = cluster.node(name).context("node")?;
    let addr = format!("{}:9477", node.ip);
    assert_eq!(
        curl_on_node(&node, &format!("http://{addr}/healthz")).await?,
        "200"
    );
    assert_eq!(
        curl_on_node(&node, "http://127.0.0.1:9477/healthz").await?,
        "000",
        "the agent listens on the node's address, not on every interface"
    );

    // More connections than the agent serves (64), each reopened when the agent closes it:
    // those it holds wait for a request until the head deadline, the rest get a 503.
    let turned_away = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..100)
        .map(|_| {
            let (addr, turned_away) = (addr.clone(), turned_away.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out).await;
                    if out.starts_with(b"HTTP/1.1 503") {
                        turned_away.fetch_add(1, Ordering::Relaxed);
                        // Not a busy loop: the point is holding slots, not burning CPU.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    let saturated = wait_for("the flood turned away with 503s", WAIT, POLL, || async {
        Ok((turned_away.load(Ordering::Relaxed) > 0).then_some(()))
    })
    .await;
    // The node's own probe (source address = the node's address) under the flood.
    let probe = curl_on_node(&node, &format!("http://{addr}/healthz")).await;
    let still_flooding = turned_away.load(Ordering::Relaxed);
    for task in &flood {
        task.abort();
    }
    saturated?;
    assert_eq!(
        probe?, "200",
        "the node's probe during the flood ({still_flooding} turned away)"
    );
    // Once the flood stops its slots free up for everyone again.
    wait_for(
        "/metrics answers elsewhere after the flood",
        WAIT,
        POLL,
        || async {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok(out.starts_with(b"HTTP/1.1 200").then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn helm_install_upgrade_uninstall() -> Result<()> {
    let Some(bin) = support::cluster_prereqs("helm_install_upgrade_uninstall") else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    let result = scenario(&cluster).await;
    if let Err(e) = result {
        return Err(e.context(format!("diagnostics:\n{}", cluster.diagnostics())));
    }
    Ok(())
}

async fn scenario(cluster: &Cluster) -> Result<()> {
    for (name, role) in [("node-a", "web"), ("node-b", "web"), ("node-c", "db")] {
        cluster.add_node(name, &[(ROLE, role)]).await?;
    }
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let client = cluster.client();
    let originals: BTreeMap<(&str, &str), String> = {
        let mut m = BTreeMap::new();
        for n in ["node-a", "node-b", "node-c"] {
            for k in ["net.ipv4.tcp_tw_reuse", "net.ipv4.ip_local_port_range"] {
                m.insert((n, k), sysctl(cluster, n, k).await?);
            }
        }
        m
    };

    // 1. Install the "previous version" (another image tag) with the demo policy.
    support::helm_install_demo(
        cluster,
        &[
            "--set",
            "agent.interval=2s",
            "--set",
            "agent.heartbeat=4s",
            "--set",
            "image.tag=0.0.9",
            "--wait",
            "--timeout",
            "3m",
        ],
    )
    .await?;

    // 2. Admission: a key outside the demo policy's scopes is refused, naming key and rule.
    let bad = r#"{"apiVersion": "nodetune.dev/v1alpha1", "kind": "NodeTuningProfile",
        "metadata": {"name": "host-vm"},
        "spec": {"sysctls": {"vm.swappiness": "10"}}}"#;
    let profiles: Api<NodeTuningProfile> = Api::all(client.clone());
    let p: NodeTuningProfile = serde_json::from_str(bad)?;
    let err = profiles
        .create(&Default::default(), &p)
        .await
        .expect_err("the demo policy refuses vm.swappiness");
    let msg = err.to_string();
    assert!(
        msg.contains("vm.swappiness") && msg.contains("allowedScopes") && msg.contains("Node"),
        "{msg}"
    );

    // 3. The web-server example on the two web nodes.
    run(
        cluster.kubectl().current_dir(support::repo_root()).args([
            "apply",
            "-f",
            "deploy/examples/web-server.yaml",
        ]),
        "kubectl apply web-server",
    )
    .await?;
    for n in ["node-a", "node-b"] {
        wait_sysctl(cluster, n, "net.ipv4.tcp_tw_reuse", "1").await?;
        wait_sysctl(cluster, n, "net.ipv4.ip_local_port_range", "32768 65000").await?;
    }
    wait_for("web-server Ready", WAIT, POLL, || async {
        Ok(ready_and_current(&profiles.get("web-server").await?).then_some(()))
    })
    .await?;
    assert_eq!(
        sysctl(cluster, "node-c", "net.ipv4.tcp_tw_reuse").await?,
        originals[&("node-c", "net.ipv4.tcp_tw_reuse")]
    );
    metrics_port_holds_under_a_flood(cluster, "node-a").await?;
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let owner = ds.get("nodetune-agent").await?.owner_references().to_vec();
    assert!(
        owner
            .iter()
            .any(|o| o.kind == "Deployment" && o.name == "nodetune-controller"),
        "the agent DaemonSet is owned by the controller Deployment: {owner:?}"
    );
    // The chart's values reach the agents through the controller: the policy ConfigMap is
    // mounted and named to the agent, the log settings are passed on.
    let pod_spec = agent_pod_spec(&ds).await?;
    assert!(
        pod_spec.volumes.iter().flatten().any(|v| v
            .config_map
            .as_ref()
            .is_some_and(|c| c.name == "nodetune-policy")),
        "policy ConfigMap mounted: {:?}",
        pod_spec.volumes
    );
    let env: BTreeMap<String, String> = pod_spec.containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    assert_eq!(
        env.get("NODETUNE_POLICY_FILE").map(String::as_str),
        Some("/etc/nodetune/policy/policy.yaml")
    );
    assert_eq!(env.get("RUST_LOG").map(String::as_str), Some("info"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let agent_uids = |pods: Api<Pod>| async move {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
            .await?;
        Ok::<BTreeMap<String, String>, anyhow::Error>(
            list.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.uid()?)))
                .collect(),
        )
    };
    let before = agent_uids(pods.clone()).await?;
    assert_eq!(before.keys().collect::<Vec<_>>(), ["node-a", "node-b"]);

    // 4. Upgrade to this version, with a stricter policy: controller and agents roll, nodes
    //    stay tuned throughout.
    let policy_values = cluster.dir().join("policy-values.yaml");
    std::fs::write(
        &policy_values,
        "policy:\n  allowedScopes: [NetworkNamespace]\n  allowedKeys: ['net\\.ipv4\\..*']\n  \
         deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout', 'net\\.ipv4\\.tcp_keepalive_.*']\n",
    )?;
    let policy_values = policy_values.to_string_lossy().into_owned();
    let upgrade = tokio::spawn({
        let mut cmd = helm(
            cluster,
            &[
                "upgrade",
                "nodetune",
                "charts/nodetune",
                "--namespace",
                NS,
                "--reuse-values",
                "--set",
                "image.tag=",
                "-f",
                &policy_values,
                "--wait",
                "--timeout",
                "3m",
            ],
        );
        async move { run(&mut cmd, "helm upgrade").await }
    });
    // Errors inside the poll are observations, so losses are collected and asserted after.
    let lost = std::sync::Mutex::new(Vec::<String>::new());
    let rolled = wait_for(
        "agents replaced on both nodes",
        WAIT,
        Duration::from_millis(200),
        || {
            let pods = pods.clone();
            let before = before.clone();
            let lost = &lost;
            async move {
                for n in ["node-a", "node-b"] {
                    let v = sysctl(cluster, n, "net.ipv4.tcp_tw_reuse").await?;
                    if v != "1" {
                        lost.lock()
                            .expect("lock")
                            .push(format!("{n}: tcp_tw_reuse={v}"));
                    }
                }
                // maxUnavailable 10% of 2 nodes rounds up to 1: one agent stays ready.
                let ready = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                    .await?
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                if ready == 0 {
                    lost.lock().expect("lock").push("no agent ready".into());
                }
                let now = agent_uids(pods).await?;
                Ok(
                    (now.len() == 2 && now.iter().all(|(n, uid)| before.get(n) != Some(uid)))
                        .then_some(now),
                )
            }
        },
    )
    .await;
    upgrade.await??;
    rolled?;
    let lost = lost.into_inner().expect("lock");
    assert!(
        lost.is_empty(),
        "during the upgrade (values lost, or more agents down than maxUnavailable): {lost:?}"
    );
    let image = agent_pod_spec(&ds).await?.containers[0]
        .image
        .clone()
        .unwrap_or_default();
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "{image}"
    );
    let reports: Api<NodeTuningReport> = Api::all(client.clone());
    let since = k8s_openapi::jiff::Timestamp::now();
    for n in ["node-a", "node-b"] {
        let status = wait_for(&format!("fresh report of {n}"), WAIT, POLL, || async {
            let s = reports.get(n).await?.status;
            Ok(s.filter(|s| s.last_report_time.as_ref().is_some_and(|t| t.0 > since)))
        })
        .await?;
        assert!(
            status.sysctls.iter().all(|e| e.state != KeyState::Restored),
            "an upgrade restores nothing: {:?}",
            status.sysctls
        );
        assert_eq!(
            sysctl(cluster, n, "net.ipv4.ip_local_port_range").await?,
            "32768 65000"
        );
    }
    wait_for("web-server Ready after the upgrade", WAIT, POLL, || async {
        Ok(ready_and_current(&profiles.get("web-server").await?).then_some(()))
    })
    .await?;

    // The upgraded policy at admission: a denied pattern and a key no allowed pattern matches,
    // both in slash form too (the policy checks the canonical dotted key).
    for (key, rule) in [
        (
            "net.ipv4.tcp_fin_timeout",
            "deniedKeys pattern \"net\\.ipv4\\.tcp_fin_timeout\"",
        ),
        (
            "net/ipv4/tcp_keepalive_time",
            "deniedKeys pattern \"net\\.ipv4\\.tcp_keepalive_.*\"",
        ),
        ("net.core.somaxconn", "matches no allowedKeys pattern"),
    ] {
        let p: NodeTuningProfile = serde_json::from_value(json!({
            "apiVersion": "nodetune.dev/v1alpha1", "kind": "NodeTuningProfile",
            "metadata": {"name": "strict"}, "spec": {"sysctls": {key: "30"}}}))?;
        let err = profiles
            .create(&Default::default(), &p)
            .await
            .expect_err(key)
            .to_string();
        let dotted = key.replace('/', ".");
        assert!(
            err.contains(&format!("sysctl key \"{dotted}\"")) && err.contains(rule),
            "{key}: {err}"
        );
    }

    // 5. Uninstall: the pre-delete hook restores, then everything goes.
    // The shim ends the hook's pod Succeeded by its exit code, as a kubelet does, so the Job
    // completes and helm goes on without help.
    let uninstall = run(
        &mut helm(
            cluster,
            &[
                "uninstall",
                "nodetune",
                "--namespace",
                NS,
                "--wait",
                "--timeout",
                "3m",
            ],
        ),
        "helm uninstall",
    )
    .await;
    if let Err(e) = uninstall {
        let mut state = String::new();
        for args in [
            &[
                "get",
                "jobs,pods,daemonsets,deployments",
                "-n",
                NS,
                "-o",
                "wide",
            ][..],
            &["describe", "jobs", "-n", NS][..],
            &["get", "events", "-n", NS, "--sort-by=.lastTimestamp"][..],
            &["get", "ntp,ntr", "-o", "wide"][..],
        ] {
            let out = cluster.kubectl().args(args).output().await?;
            state.push_str(&format!(
                "$ kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        return Err(e.context(state));
    }
    for ((n, k), v) in &originals {
        assert_eq!(
            &sysctl(cluster, n, k).await?,
            v,
            "{k} on {n} after uninstall"
        );
    }
    let labelled = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await?;
    assert!(labelled.items.is_empty(), "nodes keep the agent label");
    assert!(profiles.list(&Default::default()).await?.items.is_empty());
    assert!(reports.list(&Default::default()).await?.items.is_empty());
    wait_for("agent DaemonSet and pods gone", WAIT, POLL, || async {
        let ds_left = ds.list(&Default::default()).await?.items.len();
        let pods_left = pods.list(&Default::default()).await?.items.len();
        Ok((ds_left == 0 && pods_left == 0).then_some(()))
    })
    .await?;
    assert!(
        Api::<Job>::namespaced(client.clone(), NS)
            .list(&Default::default())
            .await?
            .items
            .is_empty(),
        "the hook Job is removed once it succeeded"
    );
    // crds.keep: the CRDs stay for the next install.
    run(
        cluster
            .kubectl()
            .args(["get", "crd", "nodetuningprofiles.nodetune.dev"]),
        "CRD kept",
    )
    .await?;
    Ok(())
}

/// The kubectl path and the controller-gone uninstall: `kubectl apply -f deploy/nodetune.yaml`
/// in one go (no ServiceAccount race), a profile applied, the controller Deployment deleted (its
/// agent DaemonSet goes with it), then `nodetune uninstall --force` releases the profile's
/// finalizer and the node labels, deletes the reports and names the nodes that keep values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn kubectl_apply_then_uninstall_without_controller() -> Result<()> {
    let Some(bin) = support::cluster_prereqs("kubectl_apply_then_uninstall_without_controller")
    else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    if let Err(e) = kubectl_scenario(&cluster).await {
        return Err(e.context(format!("diagnostics:\n{}", cluster.diagnostics())));
    }
    Ok(())
}

async fn kubectl_scenario(cluster: &Cluster) -> Result<()> {
    for (name, role) in [("node-a", "web"), ("node-b", "db")] {
        cluster.add_node(name, &[(ROLE, role)]).await?;
    }
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let client = cluster.client();
    let original = sysctl(cluster, "node-a", "net.ipv4.tcp_tw_reuse").await?;
    let kubectl = |args: &'static [&'static str]| {
        let mut cmd = cluster.kubectl();
        cmd.current_dir(support::repo_root()).args(args);
        cmd
    };
    // The README's order.
    run(
        &mut kubectl(&["apply", "-f", "deploy/nodetune.yaml"]),
        "kubectl apply deploy",
    )
    .await?;
    run(
        &mut kubectl(&[
            "-n",
            NS,
            "rollout",
            "status",
            "deployment/nodetune-controller",
            "--timeout=120s",
        ]),
        "rollout status",
    )
    .await?;
    run(
        &mut kubectl(&["apply", "-f", "deploy/examples/web-server.yaml"]),
        "kubectl apply web-server",
    )
    .await?;
    wait_sysctl(cluster, "node-a", "net.ipv4.tcp_tw_reuse", "1").await?;
    run(
        &mut kubectl(&[
            "wait",
            "ntp/web-server",
            "--for=condition=Ready",
            "--timeout=120s",
        ]),
        "kubectl wait Ready",
    )
    .await?;

    // The controller goes: the garbage collector removes the agents it owned.
    run(
        &mut kubectl(&[
            "-n",
            NS,
            "delete",
            "deployment",
            "nodetune-controller",
            "--wait",
        ]),
        "delete the controller",
    )
    .await?;
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait_for(
        "agent DaemonSet and pods gone with the controller",
        WAIT,
        POLL,
        || async {
            let left = ds.list(&Default::default()).await?.items.len()
                + pods.list(&Default::default()).await?.items.len();
            Ok((left == 0).then_some(()))
        },
    )
    .await?;

    // Now nobody can restore: the documented command releases everything and says so.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodetune"));
    cmd.env("KUBECONFIG", cluster.kubeconfig()).args([
        "uninstall",
        "--force",
        "--namespace",
        NS,
        "--timeout",
        "60s",
    ]);
    let text = run(&mut cmd, "nodetune uninstall --force").await?;
    assert!(
        text.contains("node node-a keeps tuned values for")
            && text.contains("net.ipv4.tcp_tw_reuse")
            && text.contains("released the finalizer of NodeTuningProfile web-server"),
        "{text}"
    );
    let profiles: Api<NodeTuningProfile> = Api::all(client.clone());
    let reports: Api<NodeTuningReport> = Api::all(client.clone());
    assert!(profiles.list(&Default::default()).await?.items.is_empty());
    assert!(reports.list(&Default::default()).await?.items.is_empty());
    let labelled = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await?;
    assert!(labelled.items.is_empty(), "the agent label is released");
    // Honest: the node keeps the tuned value, as the command said.
    assert_eq!(
        sysctl(cluster, "node-a", "net.ipv4.tcp_tw_reuse").await?,
        "1"
    );
    assert_ne!(
        original, "1",
        "the test needs a default that differs from the profile"
    );
    Ok(())
}

/// The pod template of the agent DaemonSet as the API server has it now.
async fn agent_pod_spec(ds: &Api<DaemonSet>) -> Result<k8s_openapi::api::core::v1::PodSpec> {
    ds.get("nodetune-agent")
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .context("agent pod spec")
}
