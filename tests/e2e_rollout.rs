//! Staged rollouts end to end on simulated nodes (each its own network namespace, with the
//! kernel's own TCP counters): waves as the nodes' kernels show them, a guard that trips for
//! real, and a profile deleted mid-rollout. One cluster for every step (a start costs 15-25 s).
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nodetune::api::NodeTuningProfile;
use nodetune::api::rollout::{Guard, RolloutPhase, RolloutSpec, RolloutStatus};
use support::e2e::Env;
use support::fixtures::{condition, profile};

const SOMAXCONN: &str = "net.core.somaxconn";
const NODES: [&str; 6] = ["node-0", "node-1", "node-2", "node-3", "node-4", "node-5"];
/// The node where a listener overflows once somaxconn is low (its wave is the second).
const LOADED: &str = "node-2";
/// The web node that joins mid-rollout (step 7); it sorts after the six others.
const ADDED: &str = "node-6";

/// The six nodes and, from step 7 on, the one added.
fn all_nodes() -> Vec<&'static str> {
    NODES.iter().copied().chain([ADDED]).collect()
}

fn rolled_out(value: &str, guards: Vec<Guard>) -> NodeTuningProfile {
    let mut p = profile("edge")
        .role("web")
        .sysctls(&[(SOMAXCONN, value)])
        .build();
    p.spec.rollout = Some(RolloutSpec {
        max_nodes_in_flight: Some(IntOrString::Int(2)),
        soak: Some("10s".into()),
        guards,
        ..Default::default()
    });
    p
}

fn rollout(p: &NodeTuningProfile) -> RolloutStatus {
    p.status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .unwrap_or_default()
}

/// What the nodes' kernels hold, sampled until the rollout of `revision` ends (`phase`): for
/// each node, when it first held `value`, and the status at each change of the rollout.
struct Observed {
    first_seen: BTreeMap<String, Duration>,
    steps: Vec<(Duration, i32, i32, i32)>,
    last: RolloutStatus,
    ever: BTreeMap<String, bool>,
}

async fn observe(
    env: &Env,
    nodes: &[&str],
    value: &str,
    revision: i64,
    until: RolloutPhase,
    limit: Duration,
) -> Result<Observed> {
    let start = Instant::now();
    let mut seen = Observed {
        first_seen: BTreeMap::new(),
        steps: Vec::new(),
        last: RolloutStatus::default(),
        ever: BTreeMap::new(),
    };
    while start.elapsed() < limit {
        for n in nodes {
            if env.sysctl(n, SOMAXCONN).await? == value {
                seen.first_seen
                    .entry(n.to_string())
                    .or_insert(start.elapsed());
                seen.ever.insert(n.to_string(), true);
            }
        }
        let p = env.profiles().get("edge").await?;
        let r = rollout(&p);
        let step = (start.elapsed(), r.wave, r.nodes_updated, r.nodes_soaking);
        if seen.steps.last().map(|s| (s.1, s.2, s.3)) != Some((step.1, step.2, step.3)) {
            println!(
                "{:>6.1}s rev {} {:?} wave {} updated {} soaking {} healthy {}",
                step.0.as_secs_f64(),
                r.current_revision,
                r.phase,
                r.wave,
                r.nodes_updated,
                r.nodes_soaking,
                r.nodes_healthy
            );
            seen.steps.push(step);
        }
        if r.current_revision == revision && r.phase == until {
            seen.last = r;
            return Ok(seen);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(env.fail(anyhow::anyhow!(
        "rollout of revision {revision} did not reach {until:?} in {limit:?}"
    )))
}

/// Six web nodes, `maxNodesInFlight: 2`, `soak: 10s`, one cluster for every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn staged_rollouts_on_six_nodes() -> Result<()> {
    let nodes: Vec<(&str, &str)> = NODES.iter().map(|n| (*n, "web")).collect();
    let Some(mut env) = Env::start("staged_rollouts_on_six_nodes", &nodes).await? else {
        return Ok(());
    };
    let original = env.sysctl("node-0", SOMAXCONN).await?;
    admission_refuses_bad_rollouts_naming_the_field(&env).await?;
    the_first_revision_reaches_every_node_at_once(&env).await?;
    an_edit_goes_out_in_waves_of_two_after_each_soak(&env).await?;
    a_guard_that_trips_rolls_the_updated_nodes_back(&env).await?;
    pause_holds_the_first_wave_and_resume_sends_it(&env).await?;
    a_new_controller_goes_on_from_the_recorded_state(&env).await?;
    undo_after_success_goes_back_to_the_last_revision_that_finished(&env).await?;
    a_node_added_mid_rollout_runs_the_stable_revision_until_a_later_wave(&mut env).await?;
    a_node_that_goes_not_ready_while_soaking_rolls_the_revision_back(&env).await?;
    twenty_harmless_revisions_under_steady_load_trip_no_guard(&env).await?;
    deleting_the_profile_mid_rollout_restores_every_node(&env, &original).await
}

/// Step 0: the API server refuses malformed rollouts, naming the field; a complete one passes.
async fn admission_refuses_bad_rollouts_naming_the_field(env: &Env) -> Result<()> {
    let yaml = |rollout: &str| {
        format!(
            "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata:\n  name: bad\nspec:\n  sysctls:\n    net.core.somaxconn: \"1024\"\n  rollout: {rollout}\n"
        )
    };
    let refused = [
        ("{soak: 10 minutes}", "spec.rollout.soak must be a duration"),
        (
            "{maxNodesInFlight: 0}",
            "maxNodesInFlight must be a count of at least 1",
        ),
        ("{maxNodesInFlight: \"150%\"}", "percentage from 1% to 100%"),
        ("{canary: {}}", "either nodes (a count) or selector"),
        (
            "{guards: [{counter: ListenOverflow, maxPerMinute: 1}]}",
            "guard counter must be one the agent reports",
        ),
        (
            "{guards: [{counter: ListenDrops, maxPerMinute: 1, maxPercentOfBefore: 200}]}",
            "exactly one of maxPerMinute",
        ),
        (
            "{guards: [{counter: ListenDrops}]}",
            "exactly one of maxPerMinute",
        ),
        ("{onFailure: Retry}", "onFailure"),
    ];
    for (rollout, want) in refused {
        match env.cluster.dry_run_apply(&yaml(rollout)).await? {
            Ok(out) => bail!("accepted rollout {rollout}: {out}"),
            Err(e) => assert!(e.contains(want), "rollout {rollout}: {e}"),
        }
    }
    let good = "{maxNodesInFlight: \"25%\", canary: {nodes: 1}, soak: 5m, onFailure: Pause, \
                guards: [{counter: ListenOverflows, maxPerMinute: 60}, {minTimeWaitHeadroomPercent: 10}]}";
    if let Err(e) = env.cluster.dry_run_apply(&yaml(good)).await? {
        bail!("refused a good rollout: {e}");
    }
    Ok(())
}

/// Step 1: a new profile is revision 1, taken as rolled out: every node at once, as without rollout.
async fn the_first_revision_reaches_every_node_at_once(env: &Env) -> Result<()> {
    env.apply(&rolled_out("4096", vec![])).await?;
    for n in NODES {
        env.wait_sysctl(n, SOMAXCONN, "4096").await?;
    }
    let p = env
        .wait_profile("edge", "revision 1 complete", |p| {
            let r = rollout(p);
            r.current_revision == 1 && r.phase == RolloutPhase::Complete && r.nodes == 6
        })
        .await?;
    assert_eq!(rollout(&p).stable_revision, Some(1));
    Ok(())
}

/// Step 2: revision 2 reaches the nodes two at a time, by name, each wave after the last soaked.
async fn an_edit_goes_out_in_waves_of_two_after_each_soak(env: &Env) -> Result<()> {
    env.apply(&rolled_out("2048", vec![])).await?;
    let seen = observe(
        env,
        &NODES,
        "2048",
        2,
        RolloutPhase::Complete,
        Duration::from_secs(150),
    )
    .await?;
    assert_eq!(seen.first_seen.len(), 6, "{:?}", seen.first_seen);
    // Every node of wave w held the value before any node of wave w+1 did.
    for w in 0..2 {
        let this = NODES[w * 2..w * 2 + 2]
            .iter()
            .map(|n| seen.first_seen[*n])
            .max()
            .context("wave")?;
        let next = NODES[w * 2 + 2..w * 2 + 4]
            .iter()
            .map(|n| seen.first_seen[*n])
            .min()
            .context("next wave")?;
        assert!(
            this < next,
            "wave {} before wave {}: {:?}",
            w + 1,
            w + 2,
            seen.first_seen
        );
        println!(
            "measured: wave {} to wave {} spacing {:.1}s",
            w + 1,
            w + 2,
            (next - this).as_secs_f64()
        );
    }
    let waves: Vec<i32> = seen.steps.iter().map(|s| s.1).collect();
    for w in 1..=3 {
        assert!(
            waves.contains(&w),
            "status showed wave {w}: {:?}",
            seen.steps
        );
    }
    assert!(
        seen.steps.iter().all(|s| s.3 <= 2),
        "never more than 2 nodes in flight: {:?}",
        seen.steps
    );
    assert_eq!(seen.last.stable_revision, Some(2));
    assert_eq!(seen.last.nodes_soaking, 0, "{:?}", seen.last);
    assert!(seen.last.soaking.is_empty(), "{:?}", seen.last);
    let p = env.profiles().get("edge").await?;
    assert_eq!(condition(&p, "Ready").map(|c| c.0), Some("True".into()));
    let (code, out, _) = cli(env, &["rollout", "status", "edge", "--timeout", "30s"]).await?;
    assert_eq!(code, 0, "rollout status of a finished rollout: {out}");
    env.wait_event("edge", "Normal RolloutComplete").await
}

/// `nodetune rollout ...` against the cluster: (exit status, stdout, stderr).
async fn cli(env: &Env, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodetune"))
        .args(args)
        .env("KUBECONFIG", env.cluster.kubeconfig())
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A listener that re-listens every second (so its accept queue takes the current somaxconn)
/// and is sent 300 connections it never accepts: with a queue of 1024 nothing overflows, with
/// one of 8 nearly everything does (`ListenOverflows` in the node's namespace).
const OVERFLOW_LOAD: &str = r#"
import socket, time
while True:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0)); srv.listen(1024)
    port = srv.getsockname()[1]
    held = []
    for _ in range(300):
        c = socket.socket(); c.setblocking(False)
        try: c.connect(("127.0.0.1", port))
        except BlockingIOError: pass
        held.append(c)
    time.sleep(1)
    for c in held: c.close()
    srv.close()
"#;

/// A Python script running in a node's network namespace, killed on drop.
struct NodeScript(tokio::process::Child);

impl NodeScript {
    fn start(env: &Env, node: &str, script: &str) -> Result<Self> {
        let child = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &env.node(node).netns,
                "python3",
                "-c",
                script,
            ])
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self(child))
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Step 3: revision 3 lowers somaxconn to 8 under a ListenOverflows guard; node-2 (wave 2) has a
/// listener under load: its overflows trip the guard, and node-0..3 go back to revision 2.
async fn a_guard_that_trips_rolls_the_updated_nodes_back(env: &Env) -> Result<()> {
    let _load = NodeScript::start(env, LOADED, OVERFLOW_LOAD)?;
    let guard = Guard {
        counter: Some("ListenOverflows".into()),
        max_per_minute: Some(60),
        ..Default::default()
    };
    env.apply(&rolled_out("8", vec![guard])).await?;
    let seen = observe(
        env,
        &NODES,
        "8",
        3,
        RolloutPhase::RolledBack,
        Duration::from_secs(150),
    )
    .await?;
    let tripped = Instant::now();
    let failure = seen.last.failure.clone().context("failure recorded")?;
    assert_eq!(failure.node, LOADED);
    assert_eq!(failure.guard, "ListenOverflows maxPerMinute 60");
    assert!(failure.during > 60, "{failure:?}");
    println!("guard: {failure:?}");
    for n in ["node-4", "node-5"] {
        assert!(!seen.ever.contains_key(n), "{n} never took revision 3");
    }
    for n in NODES {
        env.wait_sysctl(n, SOMAXCONN, "2048").await?;
    }
    println!(
        "measured: guard trip seen to every node back on revision 2 in {:.1}s",
        tripped.elapsed().as_secs_f64()
    );
    let p = env.profiles().get("edge").await?;
    let stalled = condition(&p, "Stalled").context("Stalled")?;
    assert_eq!(stalled.0, "True", "{stalled:?}");
    assert_eq!(condition(&p, "Ready").map(|c| c.0), Some("False".into()));
    env.wait_event("edge", "Warning RolloutRolledBack").await?;
    let r = rollout(&p);
    assert_eq!((r.stable_revision, r.nodes_failed), (Some(2), 1));
    let (code, _, err) = cli(env, &["rollout", "status", "edge", "--timeout", "30s"]).await?;
    assert_eq!(code, 1, "rollout status of a rolled-back rollout: {err}");
    assert!(
        err.contains("node-2") && err.contains("ListenOverflows"),
        "{err}"
    );
    bail_if(r.nodes_updated != 0, "no node left on revision 3")
}

/// Step 4: paused (`nodetune rollout pause`), an edit records revision 4 and sends no wave; the
/// failure of revision 3 is gone from the status. Resumed, wave 1 takes it.
async fn pause_holds_the_first_wave_and_resume_sends_it(env: &Env) -> Result<()> {
    let (code, _, err) = cli(env, &["rollout", "pause", "edge"]).await?;
    assert_eq!(code, 0, "{err}");
    let mut p = rolled_out("1024", vec![]);
    if let Some(r) = p.spec.rollout.as_mut() {
        r.paused = true;
    }
    env.apply(&p).await?;
    let paused = env
        .wait_profile("edge", "revision 4 paused", |p| {
            let r = rollout(p);
            r.current_revision == 4 && r.phase == RolloutPhase::Paused
        })
        .await?;
    let r = rollout(&paused);
    assert_eq!((r.wave, r.nodes_updated), (0, 0), "{r:?}");
    assert_eq!(r.failure, None, "revision 3's failure is cleared");
    for n in NODES {
        assert_eq!(
            env.sysctl(n, SOMAXCONN).await?,
            "2048",
            "{n} untouched while paused"
        );
    }
    assert_eq!(
        condition(&paused, "Stalled").map(|c| c.0),
        Some("True".into())
    );
    let (code, _, err) = cli(env, &["rollout", "resume", "edge"]).await?;
    assert_eq!(code, 0, "{err}");
    env.wait_sysctl("node-0", SOMAXCONN, "1024").await?;
    env.wait_sysctl("node-1", SOMAXCONN, "1024").await?;
    let r = rollout(&env.profiles().get("edge").await?);
    assert_eq!(r.wave, 1, "{r:?}");
    Ok(())
}

fn bail_if(cond: bool, what: &str) -> Result<()> {
    if cond {
        bail!("{what}");
    }
    Ok(())
}

/// Step 5: the leading controller's pod is deleted while wave 1 of revision 4 soaks; the
/// controller that leads next goes on from `status.rollout` and the Node annotations: the
/// rollout completes in three waves, never starting over.
async fn a_new_controller_goes_on_from_the_recorded_state(env: &Env) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    use kube::api::{DeleteParams, ListParams};
    let before = rollout(&env.profiles().get("edge").await?);
    let pods = env
        .in_ns::<Pod>()
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await?;
    for pod in &pods.items {
        env.in_ns::<Pod>()
            .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await?;
    }
    println!(
        "deleted {} controller pod(s) at wave {} of revision 4",
        pods.items.len(),
        before.wave
    );
    let seen = observe(
        env,
        &NODES,
        "1024",
        4,
        RolloutPhase::Complete,
        Duration::from_secs(240),
    )
    .await?;
    assert!(
        seen.steps.iter().all(|s| s.1 >= before.wave),
        "the wave never went back: {:?}",
        seen.steps
    );
    assert_eq!(seen.last.wave, 3, "three waves in all: {:?}", seen.last);
    for n in NODES {
        env.wait_sysctl(n, SOMAXCONN, "1024").await?;
    }
    Ok(())
}

/// Step 6: revision 5 in flight (wave 1 on it), then the profile is deleted: every node
/// restores its original value, as without rollout.
async fn deleting_the_profile_mid_rollout_restores_every_node(
    env: &Env,
    original: &str,
) -> Result<()> {
    env.apply(&rolled_out("512", vec![])).await?;
    env.wait_sysctl("node-0", SOMAXCONN, "512").await?;
    env.delete_profile("edge").await?;
    for n in NODES {
        env.wait_sysctl(n, SOMAXCONN, original).await?;
    }
    env.wait_profile_gone("edge").await?;
    // Its entries leave the Node annotations once it is gone.
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(env.cluster.client());
    env.wait(
        "no node assigned a revision of the deleted profile",
        || async {
            for n in NODES {
                let node = nodes.get(n).await?;
                let held = node
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(nodetune::api::rollout::REVISIONS_ANNOTATION))
                    .cloned();
                if held.is_some_and(|v| v.contains("edge")) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
}

/// Step 6: after revision 4 (1024) completed, `nodetune rollout undo edge` goes back to the
/// values of revision 2 (2048), the last that finished before it (revision 3 was rolled back
/// and is skipped), as revision 5 in waves; `rollout status` then exits 0.
async fn undo_after_success_goes_back_to_the_last_revision_that_finished(env: &Env) -> Result<()> {
    let (code, out, err) = cli(env, &["rollout", "undo", "edge"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("revision 2"),
        "names what it goes back to: {out}"
    );
    let seen = observe(
        env,
        &NODES,
        "2048",
        5,
        RolloutPhase::Complete,
        Duration::from_secs(150),
    )
    .await?;
    assert_eq!(seen.first_seen.len(), 6, "{:?}", seen.first_seen);
    for n in NODES {
        assert_eq!(env.sysctl(n, SOMAXCONN).await?, "2048", "{n}");
    }
    let r = &seen.last;
    assert_eq!((r.current_revision, r.stable_revision), (5, Some(5)));
    let (five, two) = (
        r.revision(5).context("rev 5")?,
        r.revision(2).context("rev 2")?,
    );
    assert_eq!(
        five.sysctls, two.sysctls,
        "revision 5 holds revision 2's values"
    );
    assert!(five.rolled_out && two.rolled_out, "{:?}", r.revisions);
    let three = r.revision(3).context("rev 3")?;
    assert!(!three.rolled_out, "the rolled-back revision never finished");
    let (code, out, _) = cli(env, &["rollout", "status", "edge", "--timeout", "30s"]).await?;
    assert_eq!(code, 0, "rollout status after the undo: {out}");
    assert!(out.contains("revision 5"), "{out}");
    Ok(())
}

/// Step 7: revision 6 (1024) in flight; node-6 (web) joins while wave 1 soaks. It runs the
/// stable revision 5 (2048) until a wave takes it: after the six others (waves go by name),
/// never revision 6 out of order. The rollout completes on all seven in four waves.
async fn a_node_added_mid_rollout_runs_the_stable_revision_until_a_later_wave(
    env: &mut Env,
) -> Result<()> {
    env.apply(&rolled_out("1024", vec![])).await?;
    env.wait_sysctl("node-0", SOMAXCONN, "1024").await?;
    let r = rollout(&env.profiles().get("edge").await?);
    assert_eq!((r.current_revision, r.wave), (6, 1), "{r:?}");
    let joined = Instant::now();
    env.add_node(ADDED, "web").await?;
    env.wait_sysctl(ADDED, SOMAXCONN, "2048").await?;
    println!(
        "{ADDED} on the stable revision {:.1}s after it joined",
        joined.elapsed().as_secs_f64()
    );
    let all = all_nodes();
    let seen = observe(
        env,
        &all,
        "1024",
        6,
        RolloutPhase::Complete,
        Duration::from_secs(240),
    )
    .await?;
    let six_last = NODES
        .iter()
        .map(|n| seen.first_seen.get(*n).copied())
        .max()
        .flatten()
        .context("the six nodes took revision 6")?;
    let added = *seen
        .first_seen
        .get(ADDED)
        .context("node-6 took revision 6")?;
    assert!(
        added > six_last,
        "{ADDED} took revision 6 after the six others: {:?}",
        seen.first_seen
    );
    assert_eq!((seen.last.nodes, seen.last.wave), (7, 4), "{:?}", seen.last);
    for n in &all {
        assert_eq!(env.sysctl(n, SOMAXCONN).await?, "1024", "{n}");
    }
    Ok(())
}

/// Sets the Node's Ready condition through its status, as a kubelet (or the node lifecycle
/// controller) would.
async fn set_ready(env: &Env, node: &str, status: &str) -> Result<()> {
    use kube::api::{Patch, PatchParams};
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(env.cluster.client());
    let reason = if status == "True" {
        "KubeletReady"
    } else {
        "KubeletNotReady"
    };
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": reason, "message": "set by e2e_rollout"
    }]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    Ok(())
}

/// Step 8: revision 7 (3000) while node-0's Node turns NotReady during its soak (its report
/// stays Ready): the guard `Node Ready` trips and every node goes back to revision 6 (1024).
async fn a_node_that_goes_not_ready_while_soaking_rolls_the_revision_back(env: &Env) -> Result<()> {
    env.apply(&rolled_out("3000", vec![])).await?;
    env.wait_sysctl("node-0", SOMAXCONN, "3000").await?;
    set_ready(env, "node-0", "False").await?;
    let marked = Instant::now();
    let rolled_back = env
        .wait_profile("edge", "revision 7 rolled back", |p| {
            let r = rollout(p);
            r.current_revision == 7 && r.phase == RolloutPhase::RolledBack
        })
        .await;
    // Ready again whatever happened: the next steps need node-0.
    set_ready(env, "node-0", "True").await?;
    let r = rollout(&rolled_back?);
    println!(
        "measured: Node NotReady to rollback in the status {:.1}s",
        marked.elapsed().as_secs_f64()
    );
    let f = r.failure.clone().context("failure recorded")?;
    assert_eq!(
        (f.node.as_str(), f.guard.as_str()),
        ("node-0", "Node Ready"),
        "{f:?}"
    );
    assert!(f.message.contains("KubeletNotReady"), "{f:?}");
    assert_eq!((r.stable_revision, r.nodes_updated), (Some(6), 0), "{r:?}");
    for n in all_nodes() {
        env.wait_sysctl(n, SOMAXCONN, "1024").await?;
    }
    Ok(())
}

/// Connections accepted and closed by the server, 20 a second, in a node's namespace: a steady
/// load with TIME_WAIT sockets and no listen queue trouble.
const STEADY_LOAD: &str = r#"
import socket, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(128)
port = srv.getsockname()[1]
def serve():
    while True:
        c, _ = srv.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
while True:
    c = socket.create_connection(("127.0.0.1", port)); c.recv(1); c.close()
    time.sleep(0.05)
"#;

/// Step 9: under a steady connection load on all seven nodes, twenty harmless revisions
/// (somaxconn 4000..4019) with a limit, a factor-of-before and a TIME_WAIT headroom guard, all
/// nodes in one wave with a 2 s soak: every one completes, none rolled back, no node failed.
async fn twenty_harmless_revisions_under_steady_load_trip_no_guard(env: &Env) -> Result<()> {
    let all = all_nodes();
    let _load: Vec<NodeScript> = all
        .iter()
        .map(|n| NodeScript::start(env, n, STEADY_LOAD))
        .collect::<Result<_>>()?;
    let counter = |name: &str| Guard {
        counter: Some(name.into()),
        ..Default::default()
    };
    let guards = vec![
        Guard {
            max_per_minute: Some(60),
            ..counter("ListenOverflows")
        },
        Guard {
            max_percent_of_before: Some(300),
            ..counter("ListenDrops")
        },
        Guard {
            min_time_wait_headroom_percent: Some(10),
            ..Default::default()
        },
    ];
    // The load shows in every node's report (segments sent) before the first revision.
    for n in &all {
        env.wait_report(n, "OutSegs rising under the load", |s| {
            rate_of(s, "OutSegs").is_some_and(|r| r > 0) && rate_of(s, "ListenDrops").is_some()
        })
        .await?;
    }
    let start = Instant::now();
    let mut each = Vec::new();
    for i in 0..20 {
        let this = Instant::now();
        let value = (4000 + i).to_string();
        let mut p = rolled_out(&value, guards.clone());
        if let Some(r) = p.spec.rollout.as_mut() {
            r.max_nodes_in_flight = Some(IntOrString::String("100%".into()));
            r.soak = Some("2s".into());
        }
        env.apply(&p).await?;
        let revision = 8 + i64::from(i);
        let done = env
            .wait_profile("edge", &format!("revision {revision} ended"), |p| {
                let r = rollout(p);
                r.current_revision == revision && r.phase != RolloutPhase::Progressing
            })
            .await?;
        let r = rollout(&done);
        assert_eq!(
            r.phase,
            RolloutPhase::Complete,
            "revision {revision}: {:?}",
            r.failure
        );
        assert_eq!((r.nodes, r.nodes_failed, r.wave), (7, 0, 1), "{r:?}");
        for n in &all {
            assert_eq!(env.sysctl(n, SOMAXCONN).await?, value, "{n} rev {revision}");
        }
        each.push(this.elapsed().as_secs_f64());
    }
    let (fastest, slowest) = each
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    println!(
        "measured: 20 harmless revisions on 7 loaded nodes in {:.1}s ({fastest:.1}-{slowest:.1}s each)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The per-minute rate of a TCP counter in a report, when it has one.
fn rate_of(s: &nodetune::api::NodeTuningReportStatus, name: &str) -> Option<i64> {
    s.tcp_counters
        .as_ref()?
        .counters
        .iter()
        .find(|c| c.name == name)?
        .per_minute
}
