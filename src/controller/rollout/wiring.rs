//! Between the controller's pass and the pure planner: the per-node digest from the caches,
//! kstatus conditions while a rollout is under way, and the Node annotation values to write.
use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use super::{Input, NodeDigest, Output, guards, node_ready, plan};
use crate::api::rollout::{RolloutPhase, RolloutStatus};
use crate::api::{NodeTuningProfile, NodeTuningProfileStatus};
use crate::conditions::{Builder, Reason, Type};
use crate::controller::cache::{ReportDigest, Reports};
use crate::plan::NodeLabels;

/// The annotation a profile carries to resume a rollout a guard paused: the revision resumed.
pub const RESUME_ANNOTATION: &str = "nodetune.dev/rollout-resume";

/// Node name to (profile name to assigned revision): the controller's view of the Node
/// annotations.
pub type Assignments = BTreeMap<String, BTreeMap<String, i64>>;

/// The assignments the Nodes of the cache hold (nodes without any left out).
pub fn assignments_of<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, i64>)>,
) -> Assignments {
    nodes
        .into_iter()
        .filter(|(_, a)| !a.is_empty())
        .map(|(n, a)| (n.to_owned(), a.clone()))
        .collect()
}

/// What one node's report says about `profile`; its rates are borrowed, not copied.
fn digest<'a>(
    profile: &str,
    node: &str,
    report: Option<&'a ReportDigest>,
    assigned: Option<i64>,
    canary: bool,
) -> NodeDigest<'a> {
    let applied = report.and_then(|r| r.profile(profile));
    let health = guards::Health {
        rates: report.map_or(Cow::Borrowed(&[][..]), |r| Cow::Borrowed(&*r.rates)),
        time_wait: report.and_then(|r| r.time_wait),
    };
    NodeDigest {
        name: node.to_string(),
        assigned,
        applied: applied.and_then(|a| a.revision),
        healthy: applied.is_some_and(|a| a.failed.is_empty()),
        canary,
        health,
        not_ready: None,
    }
}

/// What the pass knows of the fleet that a rollout decision reads.
pub struct Fleet<'a> {
    pub reports: &'a Reports,
    pub nodes: &'a NodeLabels<'a>,
    pub assignments: &'a Assignments,
    /// The soaking nodes whose Node is not Ready, with why.
    pub not_ready: &'a node_ready::NotReady,
    pub now: Timestamp,
}

/// The rollout decision for `profile` (one with `spec.rollout`) over its selected nodes.
pub fn decide(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    selected: &[&str],
    fleet: &Fleet<'_>,
) -> Option<Output> {
    let Fleet {
        reports,
        nodes,
        assignments,
        not_ready,
        now,
    } = fleet;
    let spec = profile.spec.rollout.as_ref()?;
    let name = profile.metadata.name.as_deref().unwrap_or_default();
    let canary_selector = spec.canary.as_ref().and_then(|c| c.selector.as_ref());
    let digests: Vec<NodeDigest> = selected
        .iter()
        .map(|node| {
            let canary = canary_selector.is_some_and(|sel| {
                nodes
                    .get(*node)
                    .is_some_and(|l| crate::selector::matches(Some(sel), &**l).unwrap_or(false))
            });
            let assigned = assignments.get(*node).and_then(|a| a.get(name)).copied();
            NodeDigest {
                not_ready: not_ready.get(*node).map(String::as_str),
                ..digest(
                    name,
                    node,
                    reports.get(*node).map(|r| &**r),
                    assigned,
                    canary,
                )
            }
        })
        .collect();
    let resume = profile
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RESUME_ANNOTATION))
        .and_then(|v| v.trim().parse().ok());
    Some(plan(&Input {
        spec,
        sysctls: &profile.spec.sysctls,
        mode: profile.spec.mode,
        previous: previous.and_then(|s| s.rollout.as_ref()),
        nodes: &digests,
        resume,
        now: *now,
    }))
}

/// What the pass does with a rollout decision besides the status: the assignments to write
/// on Nodes (once the status is written), the Events, and when to look again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decided {
    pub assignments: BTreeMap<String, Option<i64>>,
    pub events: Vec<crate::controller::rollup::Transition>,
    pub wake_in: Option<std::time::Duration>,
}

/// Puts the decision into the roll-up's `status` (rollout part and kstatus conditions).
pub fn settle(
    status: &mut NodeTuningProfileStatus,
    previous: Option<&NodeTuningProfileStatus>,
    out: Output,
    now: Timestamp,
) -> Decided {
    use crate::controller::rollup::Transition;
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let b = Builder::new(previous_conditions, status.observed_generation, now);
    kstatus(&mut status.conditions, &out.status, &b);
    status.rollout = Some(out.status);
    let events = out
        .events
        .into_iter()
        .map(|e| Transition {
            reason: e.reason,
            note: e.message,
        })
        .collect();
    Decided {
        assignments: out.assignments,
        events,
        wake_in: out.wake_in,
    }
}

/// kstatus while a rollout is not complete: `Reconciling` while waves go out, `Stalled` when
/// paused or rolled back, and `Ready` False until it completes.
pub fn kstatus(conditions: &mut [Condition], rollout: &RolloutStatus, b: &Builder<'_>) {
    let message = rollout.message.clone().unwrap_or_default();
    let (reason, stalled) = match rollout.phase {
        RolloutPhase::Complete => return,
        RolloutPhase::Progressing => (Reason::RollingOut, false),
        RolloutPhase::Paused => (Reason::RolloutPaused, true),
        RolloutPhase::RolledBack => (Reason::RolledBack, true),
    };
    for c in conditions.iter_mut() {
        let replaced = match c.type_.as_str() {
            "Ready" => Some(b.make(Type::Ready, false, reason, message.clone())),
            "Reconciling" if !stalled => {
                Some(b.make(Type::Reconciling, true, reason, message.clone()))
            }
            "Stalled" if stalled => Some(b.make(Type::Stalled, true, reason, message.clone())),
            _ => None,
        };
        if let Some(r) = replaced {
            *c = r;
        }
    }
}

/// Entries of the Node annotations for profiles that no longer exist (deleted, finalizer
/// released): node to (profile to `None`), so the annotation does not keep them forever.
pub fn forgotten(
    assignments: &Assignments,
    profiles: &std::collections::BTreeSet<&str>,
) -> BTreeMap<String, BTreeMap<String, Option<i64>>> {
    assignments
        .iter()
        .filter_map(|(node, held)| {
            let gone: BTreeMap<String, Option<i64>> = held
                .keys()
                .filter(|p| !profiles.contains(p.as_str()))
                .map(|p| (p.clone(), None))
                .collect();
            (!gone.is_empty()).then(|| (node.clone(), gone))
        })
        .collect()
}

/// The annotation value of `node` once `updates` (profile to revision, `None` to remove) are
/// made to what it holds; `None` when nothing is left (the annotation goes).
pub fn annotation_value(
    held: Option<&BTreeMap<String, i64>>,
    updates: &BTreeMap<String, Option<i64>>,
) -> Option<String> {
    let mut map = held.cloned().unwrap_or_default();
    for (profile, revision) in updates {
        match revision {
            Some(r) => map.insert(profile.clone(), *r),
            None => map.remove(profile),
        };
    }
    (!map.is_empty()).then(|| serde_json::to_string(&map).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::rollout::RolloutSpec;
    use crate::api::{AppliedProfile, NodeTuningReportStatus};

    #[test]
    fn annotation_values_merge_updates_and_vanish_when_empty() {
        let held = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        let up = BTreeMap::from([("a".to_string(), Some(3)), ("b".to_string(), None)]);
        assert_eq!(
            annotation_value(Some(&held), &up).as_deref(),
            Some(r#"{"a":3}"#)
        );
        let gone = BTreeMap::from([("a".to_string(), None)]);
        assert_eq!(
            annotation_value(Some(&BTreeMap::from([("a".to_string(), 1)])), &gone),
            None
        );
    }

    #[test]
    fn entries_of_profiles_that_are_gone_are_forgotten() {
        let a = Assignments::from([
            (
                "n1".to_string(),
                BTreeMap::from([("web".to_string(), 2), ("old".to_string(), 5)]),
            ),
            ("n2".to_string(), BTreeMap::from([("web".to_string(), 2)])),
        ]);
        let live = std::collections::BTreeSet::from(["web"]);
        assert_eq!(
            forgotten(&a, &live),
            BTreeMap::from([(
                "n1".to_string(),
                BTreeMap::from([("old".to_string(), None)])
            )])
        );
    }

    #[test]
    fn the_digest_reads_revision_health_and_rates_from_the_report() {
        let mut report = crate::api::NodeTuningReport::new("n1", Default::default());
        report.status = Some(NodeTuningReportStatus {
            profiles: vec![AppliedProfile {
                name: "web".into(),
                revision: Some(2),
                ..Default::default()
            }],
            tcp_counters: Some(crate::api::TcpCounterReport {
                interval_seconds: Some(30),
                counters: vec![
                    crate::api::TcpCounterValue {
                        name: "ListenOverflows".into(),
                        total: 100,
                        per_minute: Some(7),
                    },
                    crate::api::TcpCounterValue {
                        name: "ListenDrops".into(),
                        total: 1,
                        per_minute: None,
                    },
                ],
            }),
            ..Default::default()
        });
        let report = crate::controller::cache::ReportDigest::of(
            &report,
            &mut crate::controller::cache::Interner::default(),
        )
        .expect("a status");
        let d = digest("web", "n1", Some(&report), Some(2), false);
        assert_eq!((d.applied, d.healthy), (Some(2), true));
        assert_eq!(d.health.rate("ListenOverflows"), Some(7));
        assert_eq!(d.health.rates.len(), 1, "{:?}", d.health.rates);
        assert!(
            matches!(d.health.rates, Cow::Borrowed(_)),
            "the rates are borrowed from the report's digest, not copied"
        );
        let other = digest("api", "n1", Some(&report), None, false);
        assert!(!other.healthy, "the profile is not in the report");
        assert!(!digest("web", "n1", None, None, false).healthy);
    }

    #[test]
    fn a_profile_without_rollout_has_no_decision() {
        // One node, no reports, no labels, nothing assigned: only the profile differs.
        let decide_alone = |p: &NodeTuningProfile| {
            decide(
                p,
                None,
                &["n1"],
                &Fleet {
                    reports: &Reports::new(),
                    nodes: &NodeLabels::new(),
                    assignments: &Assignments::new(),
                    not_ready: &node_ready::NotReady::new(),
                    now: Timestamp::now(),
                },
            )
        };
        let mut p = NodeTuningProfile::test("web");
        assert!(decide_alone(&p).is_none());
        p.spec.rollout = Some(RolloutSpec::default());
        let first = decide_alone(&p).expect("decided");
        assert_eq!(first.status.phase, RolloutPhase::Complete);
    }
}
