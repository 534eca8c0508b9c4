//! The planner, pass by pass, on made-up fleets.
use super::*;
use crate::api::rollout::{Canary, Guard};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("ts")
}

fn values(v: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("net.core.somaxconn".to_string(), v.to_string())])
}

fn spec(in_flight: i32, soak: &str) -> RolloutSpec {
    RolloutSpec {
        max_nodes_in_flight: Some(IntOrString::Int(in_flight)),
        soak: Some(soak.into()),
        guards: vec![Guard {
            counter: Some("ListenOverflows".into()),
            max_per_minute: Some(10),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A simulated fleet: the planner's output written back (annotations), and agents that apply
/// their assignment at once with healthy reports.
struct Fleet {
    spec: RolloutSpec,
    sysctls: BTreeMap<String, String>,
    status: Option<RolloutStatus>,
    nodes: Vec<NodeDigest<'static>>,
    resume: Option<i64>,
}

impl Fleet {
    fn new(n: usize, spec: RolloutSpec) -> Self {
        let nodes = (0..n)
            .map(|i| NodeDigest {
                name: format!("node-{i}"),
                healthy: true,
                health: guards::Health {
                    rates: vec![(std::sync::Arc::from("ListenOverflows"), 0)].into(),
                    time_wait: Some((10, 1000)),
                },
                ..Default::default()
            })
            .collect();
        let mut fleet = Self {
            spec,
            sysctls: values("4096"),
            status: None,
            nodes,
            resume: None,
        };
        // The first revision is taken as rolled out already: the agents report it.
        fleet.pass(0);
        fleet.agents_apply();
        fleet
    }

    /// One controller pass at `secs`, its writes applied.
    fn pass(&mut self, secs: i64) -> Output {
        let out = plan(&Input {
            spec: &self.spec,
            sysctls: &self.sysctls,
            mode: Mode::Enforce,
            previous: self.status.as_ref(),
            nodes: &self.nodes,
            resume: self.resume,
            now: at(secs),
        });
        for n in &mut self.nodes {
            if let Some(a) = out.assignments.get(&n.name) {
                n.assigned = *a;
            }
        }
        self.status = Some(out.status.clone());
        out
    }

    /// Every agent applies its node's revision (the stable one when it has none).
    fn agents_apply(&mut self) {
        let stable = self.status.as_ref().and_then(|s| s.stable_revision);
        for n in &mut self.nodes {
            n.applied = n.assigned.or(stable);
        }
    }

    fn on(&self, revision: i64) -> Vec<&str> {
        let stable = self.status.as_ref().and_then(|s| s.stable_revision);
        self.nodes
            .iter()
            .filter(|n| n.assigned.or(stable) == Some(revision))
            .map(|n| n.name.as_str())
            .collect()
    }

    fn rate(&mut self, node: &str, per_minute: i64) {
        for n in self.nodes.iter_mut().filter(|n| n.name == node) {
            let rates = n.health.rates.to_mut();
            rates.retain(|(k, _)| &**k != "ListenOverflows");
            rates.push(("ListenOverflows".into(), per_minute));
        }
    }

    fn status(&self) -> &RolloutStatus {
        self.status.as_ref().expect("status")
    }
}

#[test]
fn six_nodes_go_out_two_at_a_time_each_wave_after_the_last_soaked() {
    let mut f = Fleet::new(6, spec(2, "10s"));
    assert_eq!(f.status().phase, RolloutPhase::Complete);
    assert_eq!(f.on(1).len(), 6);
    f.sysctls = values("8192");
    let out = f.pass(100);
    assert_eq!(out.status.current_revision, 2);
    assert_eq!(f.on(2), ["node-0", "node-1"]);
    assert_eq!(out.status.wave, 1);
    assert!(
        out.events
            .iter()
            .any(|e| e.reason == EventReason::RolloutWave)
    );
    // Not applied yet: nothing soaks, no next wave however long it takes.
    f.pass(200);
    assert_eq!(f.on(2).len(), 2);
    f.agents_apply();
    let started = f.pass(201);
    assert_eq!(started.status.nodes_soaking, 2);
    assert_eq!(started.wake_in, Some(Duration::from_secs(10)));
    // Mid-soak: no new wave.
    assert_eq!(f.pass(205).wake_in, Some(Duration::from_secs(6)));
    assert_eq!(f.on(2).len(), 2);
    // Soaked: the next wave at once.
    let w2 = f.pass(211);
    assert_eq!(f.on(2), ["node-0", "node-1", "node-2", "node-3"]);
    assert_eq!((w2.status.wave, w2.status.nodes_healthy), (2, 2));
    f.agents_apply();
    f.pass(212);
    f.pass(222);
    assert_eq!(f.on(2).len(), 6);
    f.agents_apply();
    f.pass(223);
    let done = f.pass(233);
    assert_eq!(done.status.phase, RolloutPhase::Complete);
    assert_eq!(done.status.stable_revision, Some(2));
    assert_eq!(done.status.nodes_healthy, 6);
    assert_eq!(done.status.nodes_soaking, 0);
    assert!(done.status.soaking.is_empty());
    assert!(
        done.events
            .iter()
            .any(|e| e.reason == EventReason::RolloutComplete)
    );
    assert_eq!(f.pass(300).events, [], "nothing more to say");
}

#[test]
fn a_tripped_guard_rolls_back_the_failed_and_the_updated_nodes_only() {
    let mut f = Fleet::new(6, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(100);
    f.agents_apply();
    f.pass(101);
    f.pass(111);
    assert_eq!(f.on(2).len(), 4, "wave 2 out");
    f.agents_apply();
    f.pass(112);
    f.rate("node-3", 50);
    let out = f.pass(115);
    assert_eq!(out.status.phase, RolloutPhase::RolledBack);
    assert_eq!(f.on(2), Vec::<&str>::new(), "every updated node back");
    assert_eq!(f.on(1).len(), 6);
    let failure = out.status.failure.as_ref().expect("failure");
    assert_eq!(failure.node, "node-3");
    assert_eq!(failure.guard, "ListenOverflows maxPerMinute 10");
    assert_eq!(
        (failure.before, failure.during, failure.limit),
        (Some(0), 50, 10)
    );
    let event = out
        .events
        .iter()
        .find(|e| e.reason == EventReason::RolloutRolledBack)
        .expect("event");
    assert!(
        event.warning && event.message.contains("node-3"),
        "{event:?}"
    );
    assert_eq!(out.status.nodes_failed, 1);
    // It stays rolled back: no new wave, until an edit.
    f.rate("node-3", 0);
    assert_eq!(f.pass(200).status.phase, RolloutPhase::RolledBack);
    assert!(f.on(2).is_empty());
    f.sysctls = values("4096");
    let undo = f.pass(300);
    assert_eq!(undo.status.current_revision, 3);
    assert_eq!(undo.status.failure, None);
    assert_eq!(f.on(3), ["node-0", "node-1"]);
}

#[test]
fn on_failure_pause_stops_the_waves_until_resumed() {
    let mut f = Fleet::new(
        4,
        RolloutSpec {
            on_failure: OnFailure::Pause,
            ..spec(1, "10s")
        },
    );
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.rate("node-0", 99);
    let out = f.pass(1);
    assert_eq!(out.status.phase, RolloutPhase::Paused);
    assert_eq!(f.on(2), ["node-0"], "the failed node keeps the revision");
    assert!(
        out.status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("node-0")
    );
    f.rate("node-0", 0);
    assert_eq!(f.pass(100).status.phase, RolloutPhase::Paused);
    f.resume = Some(2);
    let resumed = f.pass(101);
    assert_eq!(resumed.status.phase, RolloutPhase::Progressing);
    assert_eq!(resumed.status.failure, None);
    f.pass(111);
    assert_eq!(
        f.on(2),
        ["node-0", "node-1"],
        "soaked again, then the next wave"
    );
}

#[test]
fn spec_paused_holds_the_next_wave_but_soaks_go_on() {
    let mut f = Fleet::new(4, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.pass(1);
    f.spec.paused = true;
    let paused = f.pass(20);
    assert_eq!(paused.status.phase, RolloutPhase::Paused);
    assert_eq!(
        paused.status.nodes_soaking, 0,
        "the soak ended while paused"
    );
    assert_eq!(f.on(2).len(), 2, "no new wave");
    f.spec.paused = false;
    f.pass(21);
    assert_eq!(f.on(2).len(), 4);
    assert_eq!(f.status().phase, RolloutPhase::Progressing);
}

#[test]
fn the_canary_goes_first_alone_by_count_or_selector() {
    let mut f = Fleet::new(
        5,
        RolloutSpec {
            canary: Some(Canary {
                nodes: Some(1),
                selector: None,
            }),
            ..spec(3, "5s")
        },
    );
    f.sysctls = values("128");
    f.pass(0);
    assert_eq!(f.on(2), ["node-0"]);
    f.agents_apply();
    f.pass(1);
    f.pass(6);
    assert_eq!(f.on(2), ["node-0", "node-1", "node-2", "node-3"]);

    let mut f = Fleet::new(
        5,
        RolloutSpec {
            canary: Some(Canary {
                nodes: None,
                selector: Some(LabelSelector::default()),
            }),
            ..spec(3, "5s")
        },
    );
    f.nodes[3].canary = true;
    f.sysctls = values("128");
    f.pass(0);
    assert_eq!(f.on(2), ["node-3"]);
}

#[test]
fn a_newer_edit_supersedes_the_rollout_in_flight() {
    let mut f = Fleet::new(4, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.pass(1);
    assert_eq!(f.on(2).len(), 2);
    f.sysctls = values("256");
    let out = f.pass(5);
    assert_eq!(out.status.current_revision, 3);
    assert_eq!(out.status.stable_revision, Some(1));
    assert!(
        f.on(2).is_empty(),
        "revision 2 never finished: its nodes go back"
    );
    assert_eq!(f.on(3), ["node-0", "node-1"], "revision 3 starts at wave 1");
    assert_eq!(out.status.wave, 1);
}

#[test]
fn a_node_added_mid_rollout_runs_the_stable_revision_until_its_wave() {
    let mut f = Fleet::new(3, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.pass(1);
    f.nodes.push(NodeDigest {
        name: "node-9".into(),
        healthy: true,
        ..Default::default()
    });
    f.pass(2);
    assert_eq!(f.on(1), ["node-2", "node-9"]);
    f.pass(11);
    assert_eq!(f.on(2), ["node-0", "node-1", "node-2", "node-9"]);
}

#[test]
fn a_new_leader_goes_on_from_the_status_and_the_annotations() {
    let mut f = Fleet::new(6, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.pass(1);
    // The status round-trips through the API server; the new leader has nothing else.
    let json = serde_json::to_string(f.status()).expect("json");
    f.status = Some(serde_json::from_str(&json).expect("read back"));
    let out = f.pass(6);
    assert_eq!(out.status.wave, 1, "not restarted");
    assert_eq!(out.events, [], "no wave repeated");
    assert_eq!(out.wake_in, Some(Duration::from_secs(5)), "soak time kept");
    f.pass(11);
    assert_eq!(f.on(2).len(), 4);
}

#[test]
fn an_unready_report_fails_the_node() {
    let mut f = Fleet::new(2, spec(1, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.nodes[0].healthy = false;
    let out = f.pass(1);
    assert_eq!(out.status.phase, RolloutPhase::RolledBack);
    assert_eq!(
        out.status.failure.as_ref().map(|x| x.guard.as_str()),
        Some("report Ready")
    );
}

#[test]
fn max_in_flight_counts_and_percentages() {
    let pct = |s: &str| IntOrString::String(s.into());
    assert_eq!(max_in_flight(None, 10), 1);
    assert_eq!(max_in_flight(Some(&IntOrString::Int(3)), 10), 3);
    assert_eq!(max_in_flight(Some(&pct("25%")), 10), 2);
    assert_eq!(max_in_flight(Some(&pct("1%")), 10), 1, "at least one");
    assert_eq!(max_in_flight(Some(&pct("100%")), 1000), MAX_SOAKING_LISTED);
    assert_eq!(max_in_flight(Some(&pct("bogus")), 10), 1);
    assert_eq!(max_in_flight(Some(&IntOrString::Int(-5)), 10), 1);
}

#[test]
fn a_profile_without_a_change_stays_complete_with_no_assignment() {
    let mut f = Fleet::new(3, spec(1, "10s"));
    let out = f.pass(50);
    assert_eq!(out.status.phase, RolloutPhase::Complete);
    assert!(out.assignments.is_empty());
    assert_eq!(out.status.nodes_healthy, 3);
}

#[test]
fn a_soaking_node_whose_node_is_not_ready_fails_its_soak() {
    let mut f = Fleet::new(4, spec(2, "10s"));
    f.sysctls = values("128");
    f.pass(0);
    f.agents_apply();
    f.pass(1);
    // node-1's report is fine, but its Node went NotReady while soaking.
    f.nodes[1].not_ready = Some("the Node's Ready condition is False (KubeletNotReady)");
    let out = f.pass(5);
    assert_eq!(out.status.phase, RolloutPhase::RolledBack);
    let failure = out.status.failure.clone().expect("failure");
    assert_eq!(
        (failure.node.as_str(), failure.guard.as_str()),
        ("node-1", "Node Ready")
    );
    assert!(
        failure.message.contains("KubeletNotReady"),
        "{}",
        failure.message
    );
    assert!(
        f.on(2).is_empty(),
        "every node back on revision 1: {:?}",
        f.on(1)
    );
    // A NotReady node not soaking (not yet in a wave) judges nothing.
    let mut g = Fleet::new(4, spec(2, "10s"));
    g.nodes[3].not_ready = Some("Unknown");
    g.sysctls = values("128");
    g.pass(0);
    g.agents_apply();
    let out = g.pass(1);
    assert_eq!(out.status.phase, RolloutPhase::Progressing);
}
