//! The operator end to end on a real control plane: the controller Deployment and the agent
//! DaemonSet run the locally built binary through the node shim, with the ServiceAccounts, RBAC
//! and admission policies shipped in deploy/nodetune.yaml, never as admin. Simulated nodes are network
//! namespaces; every sysctl is checked with `sysctl -n` inside them and every socket count
//! with `ss`.
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReport};
use support::sockets::{SocketLoad, nonzero, ss_counts};
use support::{Cluster, SimNode, http_get, kubectl, wait_for};

const NS: &str = "nodetune-system";
const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";
const ROLE: &str = "node.example.com/role";
const AGENT_LABEL: &str = "nodetune.dev/agent";
/// Generous: the machine is small and shared; a pass normally takes a few seconds.
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(500);

/// A cluster with three simulated nodes (a, b: role web; c: role db), the shim, the CRDs and
/// nodetune deployed from deploy/nodetune.yaml with short agent intervals.
struct Env {
    cluster: Cluster,
    nodes: BTreeMap<String, SimNode>,
}

async fn setup(test: &str) -> Result<Option<Env>> {
    let Some(bin) = support::cluster_prereqs(test) else {
        return Ok(None);
    };
    let cluster = Cluster::start(&bin).await?;
    let mut nodes = BTreeMap::new();
    for (name, role) in [("node-a", "web"), ("node-b", "web"), ("node-c", "db")] {
        nodes.insert(
            name.to_string(),
            cluster.add_node(name, &[(ROLE, role)]).await?,
        );
    }
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    // deploy/nodetune.yaml as shipped, the controller with intervals short enough for a test.
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(&cluster, &deploy).await?;
    Ok(Some(Env { cluster, nodes }))
}

impl Env {
    fn node(&self, name: &str) -> &SimNode {
        &self.nodes[name]
    }

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
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&p),
            )
            .await?;
        Ok(())
    }

    async fn sysctl(&self, node: &str, key: &str) -> Result<String> {
        let out = self.node(node).exec_ok(&["sysctl", "-n", key]).await?;
        Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// Waits until `key` reads `want` in the node's namespace.
    async fn wait_sysctl(&self, node: &str, key: &str, want: &str) -> Result<()> {
        wait_for(&format!("{key}={want} on {node}"), WAIT, POLL, || async {
            Ok((self.sysctl(node, key).await? == want).then_some(()))
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

    async fn agent_pods(&self) -> Result<Vec<Pod>> {
        let pods = Api::<Pod>::namespaced(self.cluster.client(), NS)
            .list(&ListParams::default().labels(AGENT_SELECTOR))
            .await?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// Node name → pod UID of the running agents.
    async fn agent_uids(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .agent_pods()
            .await?
            .into_iter()
            .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.uid()?)))
            .collect())
    }

    async fn wait_agents_on(&self, want: &[&str]) -> Result<BTreeMap<String, String>> {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        wait_for(
            &format!("agent pods exactly on {want:?}"),
            WAIT,
            POLL,
            || async {
                let uids = self.agent_uids().await?;
                Ok((uids.keys().cloned().collect::<Vec<_>>() == want).then_some(uids))
            },
        )
        .await
        .map_err(|e| self.fail(e))
    }

    /// Waits for a report written after now, and checks it shows nothing restored (a restarted
    /// or replaced agent must never restore by itself).
    async fn fresh_report_without_restores(
        &self,
        node: &str,
        what: &str,
    ) -> Result<nodetune::api::NodeTuningReportStatus> {
        let since = k8s_openapi::jiff::Timestamp::now();
        let status = wait_for(what, WAIT, POLL, || async {
            let s = self.reports().get(node).await?.status;
            let fresh = s
                .as_ref()
                .and_then(|s| s.last_report_time.as_ref())
                .is_some_and(|t| t.0 > since);
            Ok(s.filter(|_| fresh))
        })
        .await
        .map_err(|e| self.fail(e))?;
        assert!(
            status.sysctls.iter().all(|e| e.state != KeyState::Restored),
            "{:?}",
            status.sysctls
        );
        Ok(status)
    }

    /// Reasons of the Events about an object, space-separated.
    async fn event_reasons(&self, name: &str) -> Result<String> {
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
                "jsonpath={.items[*].reason}",
            ],
        )
        .await
    }

    /// Adds the cluster's logs to a failure, so CI output explains it.
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("diagnostics:\n{}", self.cluster.diagnostics()))
    }
}

fn condition(p: &NodeTuningProfile, type_: &str) -> Option<(String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone()))
}

fn condition_true(p: &NodeTuningProfile, type_: &str) -> bool {
    condition(p, type_).is_some_and(|c| c.0 == "True")
}

fn condition_message(p: &NodeTuningProfile, type_: &str) -> String {
    condition(p, type_).map(|c| c.1).unwrap_or_default()
}

fn is_current(p: &NodeTuningProfile) -> bool {
    p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
}

fn report_entry<'a>(
    r: &'a NodeTuningReport,
    key: &str,
    state: KeyState,
) -> Option<&'a nodetune::api::SysctlEntry> {
    r.status
        .as_ref()?
        .sysctls
        .iter()
        .find(|e| e.key == key && e.state == state)
}

const WEB: &str = "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: web-server}
spec:
  nodeSelector: {matchLabels: {node.example.com/role: web}}
  priority: 10
  sysctls:
    net.ipv4.tcp_syncookies: \"1\"
    net.ipv4.tcp_tw_reuse: \"1\"
    net.ipv4.ip_local_port_range: \"32768 65000\"
";

/// Scenarios 1, 2, 3 and 8: apply to the selected nodes only, status and TCP counts, an edit
/// without restarting agents, a node relabelled out, the profile deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn profile_lifecycle_on_selected_nodes() -> Result<()> {
    let Some(env) = setup("profile_lifecycle_on_selected_nodes").await? else {
        return Ok(());
    };
    let default_reuse = env.sysctl("node-c", "net.ipv4.tcp_tw_reuse").await?;
    let default_range = env.sysctl("node-c", "net.ipv4.ip_local_port_range").await?;
    let default_fin = env.sysctl("node-c", "net.ipv4.tcp_fin_timeout").await?;

    // 1. Two of three nodes get the web-server set; the third is untouched.
    env.apply_profile(WEB).await?;
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, "net.ipv4.tcp_tw_reuse", "1").await?;
        env.wait_sysctl(n, "net.ipv4.ip_local_port_range", "32768 65000")
            .await?;
    }
    let p = env
        .wait_profile("web-server", "matched 2, applied 2, Ready", |p| {
            let s = p.status.clone().unwrap_or_default();
            is_current(p)
                && s.matched_nodes == 2
                && s.applied_nodes == 2
                && condition_true(p, "Ready")
        })
        .await?;
    assert_eq!(p.status.as_ref().map(|s| s.failed_nodes), Some(0));
    assert_eq!(
        env.sysctl("node-c", "net.ipv4.tcp_tw_reuse").await?,
        default_reuse
    );
    assert_eq!(
        env.sysctl("node-c", "net.ipv4.ip_local_port_range").await?,
        default_range
    );
    let uids = env.wait_agents_on(&["node-a", "node-b"]).await?;

    // 2. Known sockets in node-a's namespace: its report and the profile's totals match ss.
    let sockets = SocketLoad::start(env.node("node-a"), 7, 5).await?;
    let counts = wait_for("node-a report equal to ss", WAIT, POLL, || async {
        let ss = ss_counts(env.node("node-a")).await?;
        let r = env.reports().get("node-a").await?;
        let total = r.status.map(|s| s.tcp.total).unwrap_or_default();
        let created = ss.get("LISTEN").copied().unwrap_or(0) >= 1
            && ss.get("TIME_WAIT").copied().unwrap_or(0) >= 5
            && ss.get("ESTABLISHED").copied().unwrap_or(0) >= 14;
        Ok((created && nonzero(&total) == ss).then_some(total))
    })
    .await
    .map_err(|e| env.fail(e))?;
    assert!(
        counts["TIME_WAIT"] >= 5 && counts["ESTABLISHED"] >= 14,
        "{counts:?}"
    );
    wait_for(
        "profile tcpStates equal to the sum of its nodes' reports",
        WAIT,
        POLL,
        || async {
            let p = env.profiles().get("web-server").await?;
            let mut sum: BTreeMap<String, i64> = BTreeMap::new();
            for n in ["node-a", "node-b"] {
                for (k, v) in env
                    .reports()
                    .get(n)
                    .await?
                    .status
                    .map(|s| s.tcp.total)
                    .unwrap_or_default()
                {
                    *sum.entry(k).or_default() += v;
                }
            }
            let have = p.status.map(|s| s.tcp_states).unwrap_or_default();
            Ok((nonzero(&have) == nonzero(&sum)
                && have.get("TIME_WAIT").copied().unwrap_or(0) >= 5)
                .then_some(()))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    drop(sockets);

    // 8. kubectl shows the printer columns.
    let table = kubectl(&env.cluster, &["get", "ntp,ntr"]).await?;
    for col in [
        "MODE",
        "MATCHED",
        "APPLIED",
        "FAILED",
        "TIME_WAIT",
        "ESTABLISHED",
        "READY",
        "PROFILES",
    ] {
        assert!(table.contains(col), "column {col} missing:\n{table}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("nodetuningprofile.nodetune.dev/web-server"))
        .context("profile row")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..5], &["Enforce", "2", "2", "0"], "{table}");
    // The TIME_WAIT and ESTABLISHED columns are filters on the tcpStates list: numbers, not empty.
    for cell in &cells[5..7] {
        assert!(cell.parse::<i64>().is_ok(), "{cell:?} in {table}");
    }
    // `describe` prints list values verbatim: netstat names, never title-cased map keys.
    let described = kubectl(&env.cluster, &["describe", "ntp", "web-server"]).await?;
    let shown: Vec<Vec<&str>> = described
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for name in ["ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "LISTEN"] {
        assert!(
            shown.iter().any(|words| words[..] == ["State:", name]),
            "{name} missing:\n{described}"
        );
    }
    assert!(
        !described.contains("Established:") && !described.contains("Listen:"),
        "{described}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("nodetuningreport.nodetune.dev/node-a")
                && l.contains("web-server")),
        "{table}"
    );

    // The agent's endpoints, reached on the node's address as Prometheus would.
    let node_a = env.node("node-a");
    let metrics = http_get(&format!("{}:9477", node_a.ip), "/metrics").await?;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("nodetune_sysctl_keys{state=\"Applied\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodetune_tcp_sockets{family=\"ipv4\",state=\"LISTEN\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodetune_agent_report_writes_total"),
        "{metrics}"
    );
    assert!(
        http_get(&format!("{}:9477", node_a.ip), "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    // An Event records the transition to Ready.
    let events = env.event_reasons("web-server").await?;
    assert!(events.contains("Applied"), "events: {events}");

    // Least privilege: node-a's agent, with its own pod-bound token, may not write node-b's
    // report (admission policy) nor touch profiles (RBAC).
    let agent_a = env
        .agent_pods()
        .await?
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-a"))
        .context("agent on node-a")?;
    let agent_kubeconfig = env
        .cluster
        .with_shim(|s| {
            s.pod_records(NS, &agent_a.name_any())
                .last()
                .and_then(|r| r.kubeconfig.clone())
        })
        .context("the agent's kubeconfig")?;
    let as_agent = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env.cluster.bin("kubectl"));
        cmd.env("KUBECONFIG", &agent_kubeconfig).args(args);
        cmd
    };
    let forged = as_agent(&[
        "patch",
        "ntr",
        "node-b",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"warnings":["forged"]}}"#,
    ])
    .output()
    .await?;
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(
        !forged.status.success()
            && stderr.contains("may only write the NodeTuningReport \"node-a\""),
        "{stderr}"
    );
    let own = as_agent(&["get", "ntr", "node-a", "-o", "name"])
        .output()
        .await?;
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let can = as_agent(&["auth", "can-i", "patch", "nodetuningprofiles"])
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "no");
    // Exactly one controller replica leads, through the Lease.
    let lease = kubectl(
        &env.cluster,
        &[
            "-n",
            NS,
            "get",
            "lease",
            "nodetune-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .await?;
    let controllers = kubectl(
        &env.cluster,
        &[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=controller",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )
    .await?;
    assert!(
        controllers.split_whitespace().any(|p| p == lease),
        "lease holder {lease:?} among {controllers:?}"
    );

    // 3a. Edit: the new value lands, the agents are not restarted.
    let edited = WEB.replace(
        "net.ipv4.tcp_tw_reuse: \"1\"",
        "net.ipv4.tcp_tw_reuse: \"1\"\n    net.ipv4.tcp_fin_timeout: \"25\"",
    );
    env.apply_profile(&edited).await?;
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, "net.ipv4.tcp_fin_timeout", "25").await?;
    }
    env.wait_profile("web-server", "edit applied on both nodes", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
    })
    .await?;
    assert_eq!(
        env.agent_uids().await?,
        uids,
        "editing a profile must not restart agents"
    );
    let ds = Api::<DaemonSet>::namespaced(env.cluster.client(), NS)
        .get("nodetune-agent")
        .await?;
    assert_eq!(
        ds.metadata.generation,
        Some(1),
        "the pod template never changed"
    );

    // 3b. Relabel node-b out: its originals come back, then its agent goes.
    env.cluster
        .label_node("node-b", &[(ROLE, Some("db"))])
        .await?;
    env.wait_sysctl("node-b", "net.ipv4.tcp_tw_reuse", &default_reuse)
        .await?;
    env.wait_sysctl("node-b", "net.ipv4.tcp_fin_timeout", &default_fin)
        .await?;
    env.wait_sysctl("node-b", "net.ipv4.ip_local_port_range", &default_range)
        .await?;
    env.wait_agents_on(&["node-a"]).await?;
    let node_b = Api::<Node>::all(env.cluster.client()).get("node-b").await?;
    assert!(
        !node_b.labels().contains_key(AGENT_LABEL),
        "agent label removed after the restore"
    );
    env.wait_profile("web-server", "matched 1", |p| {
        p.status.as_ref().is_some_and(|s| s.matched_nodes == 1)
    })
    .await?;

    // 3c. Delete the profile: originals everywhere, finalizer released, no agents left.
    env.profiles()
        .delete("web-server", &DeleteParams::default())
        .await?;
    env.wait_sysctl("node-a", "net.ipv4.tcp_tw_reuse", &default_reuse)
        .await?;
    env.wait_sysctl("node-a", "net.ipv4.tcp_fin_timeout", &default_fin)
        .await?;
    env.wait_sysctl("node-a", "net.ipv4.ip_local_port_range", &default_range)
        .await?;
    wait_for("profile gone (finalizer released)", WAIT, POLL, || async {
        Ok(env
            .profiles()
            .get_opt("web-server")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .map_err(|e| env.fail(e))?;
    env.wait_agents_on(&[]).await?;
    let events = env.event_reasons("web-server").await?;
    assert!(events.contains("Restored"), "events: {events}");
    let ledger =
        std::fs::read_to_string(env.node("node-a").root.join("var/lib/nodetune/ledger.json"))
            .unwrap_or_default();
    assert!(
        !ledger.contains("tcp_tw_reuse"),
        "ledger emptied after restore: {ledger}"
    );
    Ok(())
}

/// Scenarios 4, 5 and 6: overlapping profiles, unsupported and invalid keys, DryRun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn overlaps_failures_and_dry_run() -> Result<()> {
    let Some(env) = setup("overlaps_failures_and_dry_run").await? else {
        return Ok(());
    };
    let default_backlog = env.sysctl("node-c", "net.ipv4.tcp_max_tw_buckets").await?;
    env.apply_profile(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: base}\nspec:\n  priority: 0\n  sysctls: {net.ipv4.tcp_fin_timeout: \"40\", net.ipv4.tcp_keepalive_time: \"600\"}\n",
    )
    .await?;
    env.apply_profile(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: high}\nspec:\n  priority: 10\n  nodeSelector: {matchLabels: {node.example.com/role: web}}\n  sysctls: {net.ipv4.tcp_fin_timeout: \"20\"}\n",
    )
    .await?;
    env.apply_profile(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: broken}\nspec:\n  nodeSelector: {matchLabels: {node.example.com/role: db}}\n  sysctls:\n    net.ipv4.tcp_tw_recycle: \"1\"\n    net.ipv4.tcp_syncookies: \"abc\"\n    net.ipv4.tcp_max_syn_backlog: \"4096\"\n",
    )
    .await?;
    env.apply_profile(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: dry}\nspec:\n  mode: DryRun\n  nodeSelector: {matchLabels: {node.example.com/role: db}}\n  sysctls: {net.ipv4.tcp_max_tw_buckets: \"5000\"}\n",
    )
    .await?;

    // 4. The higher priority wins where both apply; the loser says Conflicted and names it.
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, "net.ipv4.tcp_fin_timeout", "20").await?;
        env.wait_sysctl(n, "net.ipv4.tcp_keepalive_time", "600")
            .await?;
    }
    env.wait_sysctl("node-c", "net.ipv4.tcp_fin_timeout", "40")
        .await?;
    let base = env
        .wait_profile("base", "Conflicted", |p| condition_true(p, "Conflicted"))
        .await?;
    let msg = condition_message(&base, "Conflicted");
    assert!(
        msg.contains("high") && msg.contains("net.ipv4.tcp_fin_timeout"),
        "{msg}"
    );
    let high = env
        .wait_profile("high", "applied 2", |p| {
            p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
        })
        .await?;
    assert_ne!(
        condition(&high, "Conflicted").map(|c| c.0),
        Some("True".into())
    );

    // 5. Unsupported and Invalid keys are reported; the valid key still applies.
    env.wait_sysctl("node-c", "net.ipv4.tcp_max_syn_backlog", "4096")
        .await?;
    let broken = env
        .wait_profile("broken", "Degraded", |p| condition_true(p, "Degraded"))
        .await?;
    let msg = condition_message(&broken, "Degraded");
    assert!(
        msg.contains("net.ipv4.tcp_tw_recycle") && msg.contains("Unsupported"),
        "{msg}"
    );
    assert!(
        msg.contains("net.ipv4.tcp_syncookies") && msg.contains("Invalid"),
        "{msg}"
    );
    assert_eq!(broken.status.as_ref().map(|s| s.failed_nodes), Some(1));
    let report = env.reports().get("node-c").await?;
    assert!(report_entry(&report, "net.ipv4.tcp_tw_recycle", KeyState::Unsupported).is_some());
    assert!(report_entry(&report, "net.ipv4.tcp_syncookies", KeyState::Invalid).is_some());
    assert!(report_entry(&report, "net.ipv4.tcp_max_syn_backlog", KeyState::Applied).is_some());
    assert_eq!(
        env.sysctl("node-c", "net.ipv4.tcp_syncookies").await?,
        "1",
        "the invalid value was not written"
    );

    // 6. DryRun writes nothing and reports current vs desired.
    let entry = wait_for("node-c DryRun entry", WAIT, POLL, || async {
        let r = env.reports().get("node-c").await?;
        Ok(report_entry(&r, "net.ipv4.tcp_max_tw_buckets", KeyState::DryRun).cloned())
    })
    .await
    .map_err(|e| env.fail(e))?;
    assert_eq!(entry.desired.as_deref(), Some("5000"));
    assert_eq!(entry.actual.as_deref(), Some(default_backlog.as_str()));
    assert_eq!(
        env.sysctl("node-c", "net.ipv4.tcp_max_tw_buckets").await?,
        default_backlog
    );
    // restoreOnRemoval: false keeps the value when the profile goes, and lets go of the
    // original so nothing puts it back later.
    let default_intvl = env.sysctl("node-c", "net.ipv4.tcp_keepalive_intvl").await?;
    assert_ne!(default_intvl, "33");
    env.apply_profile(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: keep}\nspec:\n  restoreOnRemoval: false\n  nodeSelector: {matchLabels: {node.example.com/role: db}}\n  sysctls: {net.ipv4.tcp_keepalive_intvl: \"33\"}\n",
    )
    .await?;
    env.wait_sysctl("node-c", "net.ipv4.tcp_keepalive_intvl", "33")
        .await?;
    env.wait_profile("keep", "applied", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 1)
    })
    .await?;
    env.profiles()
        .delete("keep", &DeleteParams::default())
        .await?;
    wait_for(
        "profile keep gone (finalizer released)",
        WAIT,
        POLL,
        || async {
            Ok(env
                .profiles()
                .get_opt("keep")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    let held = wait_for(
        "node-c no longer holds the keepalive original",
        WAIT,
        POLL,
        || async {
            let r = env.reports().get("node-c").await?;
            let held = r.status.map(|s| s.held_originals).unwrap_or_default();
            Ok((!held.iter().any(|k| k == "net.ipv4.tcp_keepalive_intvl")).then_some(held))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    assert!(
        held.contains(&"net.ipv4.tcp_max_syn_backlog".to_string()),
        "other originals kept: {held:?}"
    );
    assert_eq!(
        env.sysctl("node-c", "net.ipv4.tcp_keepalive_intvl").await?,
        "33",
        "value kept"
    );

    env.wait_profile("dry", "Ready in DryRun", |p| {
        is_current(p)
            && p.status.as_ref().is_some_and(|s| s.applied_nodes == 1)
            && condition_true(p, "Ready")
    })
    .await?;
    Ok(())
}

/// Scenario 7: an agent killed mid-way is restarted and restores nothing; a restarted
/// controller converges without redoing work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn agent_crash_and_controller_restart() -> Result<()> {
    let Some(env) = setup("agent_crash_and_controller_restart").await? else {
        return Ok(());
    };
    let default_reuse = env.sysctl("node-a", "net.ipv4.tcp_tw_reuse").await?;
    env.apply_profile(WEB).await?;
    env.wait_sysctl("node-a", "net.ipv4.tcp_tw_reuse", "1")
        .await?;
    env.wait_profile("web-server", "applied 2", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
    })
    .await?;
    let uids = env.wait_agents_on(&["node-a", "node-b"]).await?;
    let ledger_path = env.node("node-a").root.join("var/lib/nodetune/ledger.json");
    let ledger_before = std::fs::read_to_string(&ledger_path).context("ledger on node-a")?;
    assert!(
        ledger_before.contains("tcp_tw_reuse")
            && ledger_before.contains(&format!("\"{default_reuse}\"")),
        "{ledger_before}"
    );

    // API outage: the apiserver is frozen; the agent still corrects drift, and reports it
    // once the API is back.
    let apiserver = std::fs::read_to_string(env.cluster.dir().join("pids/kube-apiserver.pid"))?
        .trim()
        .parse::<i32>()?;
    // SAFETY: signals to the apiserver process this test's cluster started.
    unsafe { libc::kill(apiserver, libc::SIGSTOP) };
    let frozen = async {
        env.node("node-a")
            .exec_ok(&["sysctl", "-w", "net.ipv4.tcp_tw_reuse=2"])
            .await?;
        env.wait_sysctl("node-a", "net.ipv4.tcp_tw_reuse", "1")
            .await
    }
    .await;
    // SAFETY: as above; always resume, whatever happened.
    unsafe { libc::kill(apiserver, libc::SIGCONT) };
    frozen.context("drift corrected while the API server was frozen")?;
    wait_for(
        "drift correction reported after the outage",
        WAIT,
        POLL,
        || async {
            let r = env.reports().get("node-a").await?;
            Ok((r.status.map(|s| s.drift_corrections).unwrap_or(0) >= 1).then_some(()))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;

    // Kill node-a's agent with SIGKILL: no chance to clean up.
    let pod = env
        .agent_pods()
        .await?
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-a"))
        .context("agent on node-a")?;
    let (pod_ns, pod_name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let pid = env
        .cluster
        .with_shim(|s| s.pod_records(&pod_ns, &pod_name).last().and_then(|r| r.pid))
        .context("agent pid")?;
    // SAFETY: kill(2) on a pid the shim started; at worst it is gone already (ESRCH).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("the shim restarts the agent", WAIT, POLL, || async {
        let starts = env.cluster.with_shim(|s| {
            s.pod_records(&pod_ns, &pod_name)
                .last()
                .map(|r| (r.starts, r.running))
        });
        Ok(matches!(starts, Some((n, true)) if n >= 2).then_some(()))
    })
    .await
    .map_err(|e| env.fail(e))?;
    // The restarted agent reports again, with the value still applied and nothing restored.
    let status = env
        .fresh_report_without_restores("node-a", "a fresh report from the restarted agent")
        .await?;
    assert!(
        status
            .held_originals
            .contains(&"net.ipv4.tcp_tw_reuse".to_string())
    );
    assert_eq!(env.sysctl("node-a", "net.ipv4.tcp_tw_reuse").await?, "1");
    assert_eq!(
        std::fs::read_to_string(&ledger_path)?,
        ledger_before,
        "the ledger still holds the originals"
    );
    assert_eq!(
        env.agent_uids().await?,
        uids,
        "same pods: the process was restarted in place"
    );

    // Restart the controller: delete its pods; the Deployment brings new ones.
    let deploy_pods = Api::<Pod>::namespaced(env.cluster.client(), NS);
    let old: Vec<String> = deploy_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await?
        .items
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    deploy_pods
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app.kubernetes.io/component=controller"),
        )
        .await?;
    wait_for("new controller pods running", WAIT, POLL, || async {
        let pods = deploy_pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
            .await?;
        let running = pods
            .items
            .iter()
            .filter(|p| !old.contains(&p.uid().unwrap_or_default()))
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        Ok((running >= 1).then_some(()))
    })
    .await
    .map_err(|e| env.fail(e))?;
    // Converges: an edit is still acted on, and nothing was redone.
    let edited = WEB.replace(
        "net.ipv4.tcp_tw_reuse: \"1\"",
        "net.ipv4.tcp_tw_reuse: \"0\"",
    );
    env.apply_profile(&edited).await?;
    env.wait_sysctl("node-a", "net.ipv4.tcp_tw_reuse", "0")
        .await?;
    env.wait_profile(
        "web-server",
        "edit applied after the controller restart",
        |p| {
            is_current(p)
                && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
                && condition_true(p, "Ready")
        },
    )
    .await?;
    let ds = Api::<DaemonSet>::namespaced(env.cluster.client(), NS)
        .get("nodetune-agent")
        .await?;
    assert_eq!(
        ds.metadata.generation,
        Some(1),
        "the new controller did not rewrite the DaemonSet"
    );
    assert_eq!(
        env.agent_uids().await?,
        uids,
        "agents untouched by the controller restart"
    );

    // Upgrade the agent (a new image from the controller's config): every agent pod is
    // replaced, and the new agents restore nothing.
    let image = "ghcr.io/nodetune/nodetune:0.1.1-e2e";
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "controller", "env": [{"name": "NODETUNE_AGENT_IMAGE", "value": image}]}
    ]}}}});
    Api::<Deployment>::namespaced(env.cluster.client(), NS)
        .patch(
            "nodetune-controller",
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
    let upgraded = wait_for(
        "agents replaced by the new image on both nodes",
        WAIT,
        POLL,
        || async {
            let pods = env.agent_pods().await?;
            let new: BTreeMap<String, String> = pods
                .iter()
                .filter(|p| {
                    p.spec.as_ref().is_some_and(|s| {
                        s.containers
                            .iter()
                            .any(|c| c.image.as_deref() == Some(image))
                    })
                })
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.uid()?)))
                .collect();
            Ok((pods.len() == 2 && new.len() == 2).then_some(new))
        },
    )
    .await
    .map_err(|e| env.fail(e))?;
    assert!(
        upgraded
            .values()
            .all(|u| !uids.values().any(|old| old == u)),
        "new pods"
    );
    env.fresh_report_without_restores("node-a", "a report from the upgraded agent on node-a")
        .await?;
    assert_eq!(
        env.sysctl("node-a", "net.ipv4.tcp_tw_reuse").await?,
        "0",
        "the tuned value survived the upgrade"
    );
    assert_eq!(
        std::fs::read_to_string(&ledger_path)?,
        ledger_before,
        "the ledger still holds the originals"
    );
    Ok(())
}
