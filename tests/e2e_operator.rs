//! The operator end to end on a real control plane: the controller Deployment and the agent
//! DaemonSet run the locally built binary through the node shim, with the ServiceAccounts, RBAC
//! and admission policies shipped in deploy/nodetune.yaml, never as admin. Simulated nodes are network
//! namespaces; every sysctl is checked with `sysctl -n` inside them and every socket count
//! with `ss`.
//!
//! Each test is one cluster (a start costs 15-25 s) and runs named steps in order: a step
//! checks one behaviour and leaves the cluster in the state the next one starts from.
mod support;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningReportStatus};
use nodetune::names::{AGENT_NODE_LABEL, DAEMONSET_NAME};
use support::e2e::{Env, NS};
use support::fixtures::{
    ROLE, condition, condition_message, condition_true, is_current, map, profile, report_entry,
};
use support::sockets::{SocketLoad, nonzero, ss_counts};
use support::{http_get, kubectl};

const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
const LEDGER: &str = "var/lib/nodetune/ledger.json";
const REUSE: &str = "net.ipv4.tcp_tw_reuse";
const RANGE: &str = "net.ipv4.ip_local_port_range";
const FIN: &str = "net.ipv4.tcp_fin_timeout";

/// The web-server profile (role web, priority 10) with `changes` over its three keys.
fn web_server(changes: &[(&str, &str)]) -> NodeTuningProfile {
    let mut p = profile("web-server")
        .role("web")
        .priority(10)
        .sysctls(&[
            ("net.ipv4.tcp_syncookies", "1"),
            (REUSE, "1"),
            (RANGE, "32768 65000"),
        ])
        .build();
    p.spec.sysctls.extend(map(changes));
    p
}

/// Three simulated nodes (a, b: role web; c: role db) and nodetune as shipped, short intervals.
async fn setup(test: &str) -> Result<Option<Env>> {
    Env::start(
        test,
        &[("node-a", "web"), ("node-b", "web"), ("node-c", "db")],
    )
    .await
}

/// The kernel's values before nodetune, read on the untouched node-c.
struct Defaults {
    reuse: String,
    range: String,
    fin: String,
}

impl Defaults {
    async fn read(env: &Env) -> Result<Self> {
        Ok(Defaults {
            reuse: env.sysctl("node-c", REUSE).await?,
            range: env.sysctl("node-c", RANGE).await?,
            fin: env.sysctl("node-c", FIN).await?,
        })
    }

    /// Waits until `node` holds every default again.
    async fn wait_restored(&self, env: &Env, node: &str) -> Result<()> {
        env.wait_sysctl(node, REUSE, &self.reuse).await?;
        env.wait_sysctl(node, FIN, &self.fin).await?;
        env.wait_sysctl(node, RANGE, &self.range).await
    }
}

/// Scenarios 1, 2, 3 and 8: apply to the selected nodes only, status and TCP counts, an edit
/// without restarting agents, a node relabelled out, the profile deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn profile_lifecycle_on_selected_nodes() -> Result<()> {
    let Some(env) = setup("profile_lifecycle_on_selected_nodes").await? else {
        return Ok(());
    };
    let defaults = Defaults::read(&env).await?;
    let uids = web_profile_tunes_the_selected_nodes_only(&env, &defaults).await?;
    reports_and_profile_count_the_sockets_ss_sees(&env).await?;
    kubectl_shows_printer_columns_and_netstat_names(&env).await?;
    agent_serves_metrics_and_an_event_records_ready(&env).await?;
    agent_may_read_only_its_own_report_and_not_touch_profiles(&env).await?;
    one_controller_replica_holds_the_lease(&env).await?;
    an_edit_lands_without_restarting_agents(&env, &uids).await?;
    a_node_relabelled_out_gets_its_originals_back(&env, &defaults).await?;
    deleting_the_profile_restores_every_node(&env, &defaults).await
}

/// 1. Two of three nodes get the web-server set; the third is untouched.
async fn web_profile_tunes_the_selected_nodes_only(
    env: &Env,
    defaults: &Defaults,
) -> Result<BTreeMap<String, String>> {
    env.apply(&web_server(&[])).await?;
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, REUSE, "1").await?;
        env.wait_sysctl(n, RANGE, "32768 65000").await?;
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
    assert_eq!(env.sysctl("node-c", REUSE).await?, defaults.reuse);
    assert_eq!(env.sysctl("node-c", RANGE).await?, defaults.range);
    env.wait_agents_on(&["node-a", "node-b"]).await
}

/// 2. Known sockets in node-a's namespace: its report and the profile's totals match ss.
async fn reports_and_profile_count_the_sockets_ss_sees(env: &Env) -> Result<()> {
    let sockets = SocketLoad::start(env.node("node-a"), 7, 5).await?;
    let counts = env
        .wait("node-a report equal to ss", || async {
            let ss = ss_counts(env.node("node-a")).await?;
            let r = env.reports().get("node-a").await?;
            let total = r.status.map(|s| s.tcp.total).unwrap_or_default();
            let created = ss.get("LISTEN").copied().unwrap_or(0) >= 1
                && ss.get("TIME_WAIT").copied().unwrap_or(0) >= 5
                && ss.get("ESTABLISHED").copied().unwrap_or(0) >= 14;
            Ok((created && nonzero(&total) == ss).then_some(total))
        })
        .await?;
    assert!(
        counts["TIME_WAIT"] >= 5 && counts["ESTABLISHED"] >= 14,
        "{counts:?}"
    );
    let what = "profile tcpStates equal to the sum of its nodes' reports";
    env.wait(what, || async {
        let p = env.profiles().get("web-server").await?;
        let mut sum: BTreeMap<String, i64> = BTreeMap::new();
        for n in ["node-a", "node-b"] {
            let status = env.reports().get(n).await?.status;
            for (k, v) in status.map(|s| s.tcp.total).unwrap_or_default() {
                *sum.entry(k).or_default() += v;
            }
        }
        let have = p.status.map(|s| s.tcp_states).unwrap_or_default();
        Ok(
            (nonzero(&have) == nonzero(&sum) && have.get("TIME_WAIT").copied().unwrap_or(0) >= 5)
                .then_some(()),
        )
    })
    .await?;
    drop(sockets);
    Ok(())
}

/// 8. kubectl shows the printer columns; `describe` shows netstat names.
async fn kubectl_shows_printer_columns_and_netstat_names(env: &Env) -> Result<()> {
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
    Ok(())
}

/// The agent's endpoints, reached on the node's address as Prometheus would; an Event records
/// the transition to Ready.
async fn agent_serves_metrics_and_an_event_records_ready(env: &Env) -> Result<()> {
    let addr = format!("{}:9477", env.node("node-a").ip);
    let metrics = http_get(&addr, "/metrics").await?;
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
        http_get(&addr, "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    let events = env.event_reasons("web-server").await?;
    assert!(events.contains("Applied"), "events: {events}");
    Ok(())
}

/// Least privilege: node-a's agent, with its own pod-bound token, may not write node-b's
/// report (admission policy) nor touch profiles (RBAC).
async fn agent_may_read_only_its_own_report_and_not_touch_profiles(env: &Env) -> Result<()> {
    let agent_a = env.agent_on("node-a").await?;
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
    Ok(())
}

/// Exactly one controller replica leads, through the Lease.
async fn one_controller_replica_holds_the_lease(env: &Env) -> Result<()> {
    let holder = "jsonpath={.spec.holderIdentity}";
    let lease_args = [
        "-n",
        NS,
        "get",
        "lease",
        "nodetune-controller",
        "-o",
        holder,
    ];
    let lease = kubectl(&env.cluster, &lease_args).await?;
    let names = "jsonpath={.items[*].metadata.name}";
    let pod_args = [
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        CONTROLLER_SELECTOR,
        "-o",
        names,
    ];
    let controllers = kubectl(&env.cluster, &pod_args).await?;
    assert!(
        controllers.split_whitespace().any(|p| p == lease),
        "lease holder {lease:?} among {controllers:?}"
    );
    Ok(())
}

/// The agent DaemonSet's generation: 1 as long as its pod template never changed.
async fn daemonset_generation(env: &Env) -> Result<Option<i64>> {
    let ds = env.in_ns::<DaemonSet>().get(DAEMONSET_NAME).await?;
    Ok(ds.metadata.generation)
}

/// 3a. Edit: the new value lands, the agents are not restarted.
async fn an_edit_lands_without_restarting_agents(
    env: &Env,
    uids: &BTreeMap<String, String>,
) -> Result<()> {
    env.apply(&web_server(&[(FIN, "25")])).await?;
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, FIN, "25").await?;
    }
    env.wait_profile("web-server", "edit applied on both nodes", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
    })
    .await?;
    assert_eq!(
        &env.agent_uids().await?,
        uids,
        "editing a profile must not restart agents"
    );
    assert_eq!(
        daemonset_generation(env).await?,
        Some(1),
        "the pod template never changed"
    );
    Ok(())
}

/// 3b. Relabel node-b out: its originals come back, then its agent goes.
async fn a_node_relabelled_out_gets_its_originals_back(
    env: &Env,
    defaults: &Defaults,
) -> Result<()> {
    env.cluster
        .label_node("node-b", &[(ROLE, Some("db"))])
        .await?;
    defaults.wait_restored(env, "node-b").await?;
    env.wait_agents_on(&["node-a"]).await?;
    let node_b = Api::<Node>::all(env.cluster.client()).get("node-b").await?;
    assert!(
        !node_b.labels().contains_key(AGENT_NODE_LABEL),
        "agent label removed after the restore"
    );
    env.wait_profile("web-server", "matched 1", |p| {
        p.status.as_ref().is_some_and(|s| s.matched_nodes == 1)
    })
    .await?;
    Ok(())
}

/// 3c. Delete the profile: originals everywhere, finalizer released, no agents left.
async fn deleting_the_profile_restores_every_node(env: &Env, defaults: &Defaults) -> Result<()> {
    env.delete_profile("web-server").await?;
    defaults.wait_restored(env, "node-a").await?;
    env.wait_profile_gone("web-server").await?;
    env.wait_agents_on(&[]).await?;
    let events = env.event_reasons("web-server").await?;
    assert!(events.contains("Restored"), "events: {events}");
    let ledger = std::fs::read_to_string(env.node("node-a").root.join(LEDGER)).unwrap_or_default();
    assert!(
        !ledger.contains("tcp_tw_reuse"),
        "ledger emptied after restore: {ledger}"
    );
    Ok(())
}

const TW_BUCKETS: &str = "net.ipv4.tcp_max_tw_buckets";
const KEEPALIVE_INTVL: &str = "net.ipv4.tcp_keepalive_intvl";

/// base (all nodes, priority 0), high (web, priority 10, overlapping base), broken (db:
/// an unsupported key, an invalid value, a valid key), dry (db, DryRun).
fn overlapping_broken_and_dry_profiles() -> [NodeTuningProfile; 4] {
    [
        profile("base")
            .sysctls(&[(FIN, "40"), ("net.ipv4.tcp_keepalive_time", "600")])
            .build(),
        profile("high")
            .role("web")
            .priority(10)
            .sysctls(&[(FIN, "20")])
            .build(),
        profile("broken")
            .role("db")
            .sysctls(&[
                ("net.ipv4.tcp_tw_recycle", "1"),
                ("net.ipv4.tcp_syncookies", "abc"),
                ("net.ipv4.tcp_max_syn_backlog", "4096"),
            ])
            .build(),
        profile("dry")
            .role("db")
            .dry_run()
            .sysctls(&[(TW_BUCKETS, "5000")])
            .build(),
    ]
}

/// Scenarios 4, 5 and 6: overlapping profiles, unsupported and invalid keys, DryRun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn overlaps_failures_and_dry_run() -> Result<()> {
    let Some(env) = setup("overlaps_failures_and_dry_run").await? else {
        return Ok(());
    };
    let default_buckets = env.sysctl("node-c", TW_BUCKETS).await?;
    for p in overlapping_broken_and_dry_profiles() {
        env.apply(&p).await?;
    }
    higher_priority_wins_and_the_loser_names_it(&env).await?;
    unsupported_and_invalid_keys_are_reported_and_valid_ones_apply(&env).await?;
    dry_run_writes_nothing_and_reports_current_vs_desired(&env, &default_buckets).await?;
    keep_on_removal_keeps_the_value_and_lets_go_of_the_original(&env).await?;
    env.wait_profile("dry", "Ready in DryRun", |p| {
        is_current(p)
            && p.status.as_ref().is_some_and(|s| s.applied_nodes == 1)
            && condition_true(p, "Ready")
    })
    .await?;
    Ok(())
}

/// 4. The higher priority wins where both apply; the loser says Conflicted and names it.
async fn higher_priority_wins_and_the_loser_names_it(env: &Env) -> Result<()> {
    for n in ["node-a", "node-b"] {
        env.wait_sysctl(n, FIN, "20").await?;
        env.wait_sysctl(n, "net.ipv4.tcp_keepalive_time", "600")
            .await?;
    }
    env.wait_sysctl("node-c", FIN, "40").await?;
    let base = env
        .wait_profile("base", "Conflicted", |p| condition_true(p, "Conflicted"))
        .await?;
    let msg = condition_message(&base, "Conflicted");
    assert!(msg.contains("high") && msg.contains(FIN), "{msg}");
    let high = env
        .wait_profile("high", "applied 2", |p| {
            p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
        })
        .await?;
    assert_ne!(
        condition(&high, "Conflicted").map(|c| c.0),
        Some("True".into())
    );
    Ok(())
}

/// 5. Unsupported and Invalid keys are reported; the valid key still applies.
async fn unsupported_and_invalid_keys_are_reported_and_valid_ones_apply(env: &Env) -> Result<()> {
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
    Ok(())
}

/// 6. DryRun writes nothing and reports current vs desired.
async fn dry_run_writes_nothing_and_reports_current_vs_desired(
    env: &Env,
    default_buckets: &str,
) -> Result<()> {
    let entry = env
        .wait("node-c DryRun entry", || async {
            let r = env.reports().get("node-c").await?;
            Ok(report_entry(&r, TW_BUCKETS, KeyState::DryRun).cloned())
        })
        .await?;
    assert_eq!(entry.desired.as_deref(), Some("5000"));
    assert_eq!(entry.actual.as_deref(), Some(default_buckets));
    assert_eq!(env.sysctl("node-c", TW_BUCKETS).await?, default_buckets);
    Ok(())
}

/// restoreOnRemoval: false keeps the value when the profile goes, and lets go of the
/// original so nothing puts it back later.
async fn keep_on_removal_keeps_the_value_and_lets_go_of_the_original(env: &Env) -> Result<()> {
    let default_intvl = env.sysctl("node-c", KEEPALIVE_INTVL).await?;
    assert_ne!(default_intvl, "33");
    let keep = profile("keep").role("db").keep_on_removal();
    env.apply(&keep.sysctls(&[(KEEPALIVE_INTVL, "33")]).build())
        .await?;
    env.wait_sysctl("node-c", KEEPALIVE_INTVL, "33").await?;
    env.wait_profile("keep", "applied", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 1)
    })
    .await?;
    env.delete_profile("keep").await?;
    env.wait_profile_gone("keep").await?;
    let held = env
        .wait("node-c no longer holds the keepalive original", || async {
            let r = env.reports().get("node-c").await?;
            let held = r.status.map(|s| s.held_originals).unwrap_or_default();
            Ok((!held.iter().any(|k| k == KEEPALIVE_INTVL)).then_some(held))
        })
        .await?;
    assert!(
        held.contains(&"net.ipv4.tcp_max_syn_backlog".to_string()),
        "other originals kept: {held:?}"
    );
    assert_eq!(
        env.sysctl("node-c", KEEPALIVE_INTVL).await?,
        "33",
        "value kept"
    );
    Ok(())
}

/// What the crash scenario compares against: the agents and node-a's ledger once applied.
struct Applied {
    uids: BTreeMap<String, String>,
    ledger: String,
}

/// Scenario 7: an agent killed mid-way is restarted and restores nothing; a restarted
/// controller converges without redoing work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn agent_crash_and_controller_restart() -> Result<()> {
    let Some(env) = setup("agent_crash_and_controller_restart").await? else {
        return Ok(());
    };
    let applied = web_profile_applied_and_its_originals_in_the_ledger(&env).await?;
    agent_corrects_drift_while_the_apiserver_is_frozen(&env).await?;
    a_sigkilled_agent_restarts_in_place_and_restores_nothing(&env, &applied).await?;
    a_restarted_controller_converges_without_redoing_work(&env, &applied).await?;
    an_agent_upgrade_replaces_the_pods_and_restores_nothing(&env, &applied).await
}

async fn web_profile_applied_and_its_originals_in_the_ledger(env: &Env) -> Result<Applied> {
    let default_reuse = env.sysctl("node-a", REUSE).await?;
    env.apply(&web_server(&[])).await?;
    env.wait_sysctl("node-a", REUSE, "1").await?;
    env.wait_profile("web-server", "applied 2", |p| {
        is_current(p) && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
    })
    .await?;
    let uids = env.wait_agents_on(&["node-a", "node-b"]).await?;
    let ledger = std::fs::read_to_string(env.node("node-a").root.join(LEDGER))
        .context("ledger on node-a")?;
    assert!(
        ledger.contains("tcp_tw_reuse") && ledger.contains(&format!("\"{default_reuse}\"")),
        "{ledger}"
    );
    Ok(Applied { uids, ledger })
}

/// API outage: the apiserver is frozen; the agent still corrects drift, and reports it once
/// the API is back.
async fn agent_corrects_drift_while_the_apiserver_is_frozen(env: &Env) -> Result<()> {
    let apiserver = std::fs::read_to_string(env.cluster.dir().join("pids/kube-apiserver.pid"))?
        .trim()
        .parse::<i32>()?;
    // SAFETY: signals to the apiserver process this test's cluster started.
    unsafe { libc::kill(apiserver, libc::SIGSTOP) };
    let frozen = async {
        env.node("node-a")
            .exec_ok(&["sysctl", "-w", "net.ipv4.tcp_tw_reuse=2"])
            .await?;
        env.wait_sysctl("node-a", REUSE, "1").await
    }
    .await;
    // SAFETY: as above; always resume, whatever happened.
    unsafe { libc::kill(apiserver, libc::SIGCONT) };
    frozen.context("drift corrected while the API server was frozen")?;
    env.wait("drift correction reported after the outage", || async {
        let r = env.reports().get("node-a").await?;
        Ok((r.status.map(|s| s.drift_corrections).unwrap_or(0) >= 1).then_some(()))
    })
    .await
}

/// Waits for a report written after now, and checks it shows nothing restored (a restarted
/// or replaced agent must never restore by itself).
async fn fresh_report_without_restores(
    env: &Env,
    node: &str,
    what: &str,
) -> Result<NodeTuningReportStatus> {
    let since = k8s_openapi::jiff::Timestamp::now();
    let status = env
        .wait_report(node, what, |s| {
            s.last_report_time.as_ref().is_some_and(|t| t.0 > since)
        })
        .await?;
    assert!(
        status.sysctls.iter().all(|e| e.state != KeyState::Restored),
        "{:?}",
        status.sysctls
    );
    Ok(status)
}

/// Kill node-a's agent with SIGKILL (no chance to clean up): the shim restarts it in the same
/// pod, it reports again with the value still applied, and nothing is restored.
async fn a_sigkilled_agent_restarts_in_place_and_restores_nothing(
    env: &Env,
    applied: &Applied,
) -> Result<()> {
    let pod = env.agent_on("node-a").await?;
    let (pod_ns, pod_name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let pid = env
        .cluster
        .with_shim(|s| s.pod_records(&pod_ns, &pod_name).last().and_then(|r| r.pid))
        .context("agent pid")?;
    // SAFETY: kill(2) on a pid the shim started; at worst it is gone already (ESRCH).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    env.wait("the shim restarts the agent", || async {
        let starts = env.cluster.with_shim(|s| {
            s.pod_records(&pod_ns, &pod_name)
                .last()
                .map(|r| (r.starts, r.running))
        });
        Ok(matches!(starts, Some((n, true)) if n >= 2).then_some(()))
    })
    .await?;
    let status =
        fresh_report_without_restores(env, "node-a", "a fresh report from the restarted agent")
            .await?;
    assert!(status.held_originals.contains(&REUSE.to_string()));
    assert_eq!(env.sysctl("node-a", REUSE).await?, "1");
    assert_eq!(
        std::fs::read_to_string(env.node("node-a").root.join(LEDGER))?,
        applied.ledger,
        "the ledger still holds the originals"
    );
    assert_eq!(
        env.agent_uids().await?,
        applied.uids,
        "same pods: the process was restarted in place"
    );
    Ok(())
}

/// Restart the controller (delete its pods; the Deployment brings new ones): an edit is still
/// acted on, and nothing was redone.
async fn a_restarted_controller_converges_without_redoing_work(
    env: &Env,
    applied: &Applied,
) -> Result<()> {
    let pods = env.in_ns::<Pod>();
    let by_component = ListParams::default().labels(CONTROLLER_SELECTOR);
    let old: Vec<String> = pods
        .list(&by_component)
        .await?
        .items
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    pods.delete_collection(&DeleteParams::default(), &by_component)
        .await?;
    env.wait("new controller pods running", || async {
        let running = pods
            .list(&by_component)
            .await?
            .items
            .iter()
            .filter(|p| !old.contains(&p.uid().unwrap_or_default()))
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        Ok((running >= 1).then_some(()))
    })
    .await?;
    env.apply(&web_server(&[(REUSE, "0")])).await?;
    env.wait_sysctl("node-a", REUSE, "0").await?;
    let what = "edit applied after the controller restart";
    env.wait_profile("web-server", what, |p| {
        is_current(p)
            && p.status.as_ref().is_some_and(|s| s.applied_nodes == 2)
            && condition_true(p, "Ready")
    })
    .await?;
    assert_eq!(
        daemonset_generation(env).await?,
        Some(1),
        "the new controller did not rewrite the DaemonSet"
    );
    assert_eq!(
        env.agent_uids().await?,
        applied.uids,
        "agents untouched by the controller restart"
    );
    Ok(())
}

/// Upgrade the agent (a new image from the controller's config): every agent pod is replaced,
/// and the new agents restore nothing.
async fn an_agent_upgrade_replaces_the_pods_and_restores_nothing(
    env: &Env,
    applied: &Applied,
) -> Result<()> {
    let image = "ghcr.io/nodetune/nodetune:0.1.1-e2e";
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "controller", "env": [{"name": "NODETUNE_AGENT_IMAGE", "value": image}]}
    ]}}}});
    env.in_ns::<Deployment>()
        .patch(
            "nodetune-controller",
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
    let what = "agents replaced by the new image on both nodes";
    let upgraded = env
        .wait(what, || async {
            let pods = env.agent_pods().await?;
            let new: BTreeMap<String, String> = pods
                .iter()
                .filter(|p| runs_image(p, image))
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.uid()?)))
                .collect();
            Ok((pods.len() == 2 && new.len() == 2).then_some(new))
        })
        .await?;
    assert!(
        upgraded
            .values()
            .all(|u| !applied.uids.values().any(|old| old == u)),
        "new pods"
    );
    fresh_report_without_restores(env, "node-a", "a report from the upgraded agent on node-a")
        .await?;
    assert_eq!(
        env.sysctl("node-a", REUSE).await?,
        "0",
        "the tuned value survived the upgrade"
    );
    assert_eq!(
        std::fs::read_to_string(env.node("node-a").root.join(LEDGER))?,
        applied.ledger,
        "the ledger still holds the originals"
    );
    Ok(())
}

fn runs_image(p: &Pod, image: &str) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.image.as_deref() == Some(image))
    })
}
