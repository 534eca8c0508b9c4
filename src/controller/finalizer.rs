//! The `nodetune.dev/cleanup` finalizer: a profile stays until every node's agent has let go of
//! it (restored its keys), or until `--finalizer-timeout` after its deletion.
//!
//! [`decide`] is pure; the pass plan turns its decisions into finalizer patches
//! ([`super::plan::FinalizerPatch`]).
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::cache::Reports;
use super::labels::NodeLabels;
use crate::api::NodeTuningProfile;

pub use crate::names::FINALIZER;

/// What to do with one profile's finalizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinalizerAction {
    /// Live profile without the finalizer.
    Add,
    /// Live profile with it, or a deleting one without it: nothing to do.
    Nothing,
    /// Deleting; these nodes (still existing) have not restored yet.
    Wait {
        nodes: Vec<String>,
        remaining: Duration,
    },
    /// Deleting and every node let go.
    Release,
    /// Deleting, the timeout passed and these nodes still list the profile.
    ReleaseTimedOut { nodes: Vec<String> },
}

fn has_finalizer(p: &NodeTuningProfile) -> bool {
    p.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// Nodes whose report still lists `profile` (reports of vanished nodes do not count).
pub fn holdouts(profile: &str, nodes: &NodeLabels<'_>, reports: &Reports) -> Vec<String> {
    let mut nodes: Vec<String> = reports
        .iter()
        .filter(|(node, _)| nodes.contains_key(&***node))
        .filter(|(_, r)| r.profile(profile).is_some())
        .map(|(node, _)| node.to_string())
        .collect();
    // The report index is unordered; messages and Events name nodes in a stable order.
    nodes.sort_unstable();
    nodes
}

pub fn decide(
    p: &NodeTuningProfile,
    nodes: &NodeLabels<'_>,
    reports: &Reports,
    now: Timestamp,
    timeout: Duration,
) -> FinalizerAction {
    let has = has_finalizer(p);
    let Some(deleted) = p.metadata.deletion_timestamp.as_ref() else {
        return if has {
            FinalizerAction::Nothing
        } else {
            FinalizerAction::Add
        };
    };
    if !has {
        return FinalizerAction::Nothing;
    }
    let name = p.metadata.name.as_deref().unwrap_or_default();
    let nodes = holdouts(name, nodes, reports);
    if nodes.is_empty() {
        return FinalizerAction::Release;
    }
    let elapsed = Duration::try_from(now.duration_since(deleted.0)).unwrap_or(Duration::ZERO);
    if elapsed >= timeout {
        FinalizerAction::ReleaseTimedOut { nodes }
    } else {
        FinalizerAction::Wait {
            nodes,
            remaining: timeout - elapsed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeTuningReport;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("ts")
    }

    /// `web`, with our finalizer (after another's) or none, deleted at `t(deleted_at)` or live.
    fn profile(finalizer: bool, deleted_at: Option<i64>) -> NodeTuningProfile {
        let mut p = NodeTuningProfile::test("web");
        if finalizer {
            p = p.with_finalizers(&["other/x", FINALIZER]);
        }
        match deleted_at {
            Some(s) => p.deleted_at(t(s)),
            None => p,
        }
    }

    fn report(node: &str, profiles: &[&str]) -> NodeTuningReport {
        NodeTuningReport::test(node).listing(profiles)
    }

    #[test]
    fn decisions() {
        let nodes: NodeLabels = crate::plan::owned_node_labels([
            ("a".to_string(), std::collections::BTreeMap::new()),
            ("b".to_string(), std::collections::BTreeMap::new()),
        ]);
        let ra = report("a", &["web"]);
        let rb = report("b", &["other"]);
        let gone = report("gone", &["web"]);
        let reports = crate::controller::cache::reports_of([&ra, &rb, &gone]);
        let timeout = Duration::from_secs(300);
        assert_eq!(
            decide(&profile(false, None), &nodes, &reports, t(0), timeout),
            FinalizerAction::Add
        );
        assert_eq!(
            decide(&profile(true, None), &nodes, &reports, t(0), timeout),
            FinalizerAction::Nothing
        );
        assert_eq!(
            decide(&profile(false, Some(0)), &nodes, &reports, t(0), timeout),
            FinalizerAction::Nothing
        );
        assert_eq!(
            decide(&profile(true, Some(0)), &nodes, &reports, t(100), timeout),
            FinalizerAction::Wait {
                nodes: vec!["a".into()],
                remaining: Duration::from_secs(200)
            }
        );
        assert_eq!(
            decide(&profile(true, Some(0)), &nodes, &reports, t(300), timeout),
            FinalizerAction::ReleaseTimedOut {
                nodes: vec!["a".into()]
            }
        );
        let empty = Reports::new();
        assert_eq!(
            decide(&profile(true, Some(0)), &nodes, &empty, t(1), timeout),
            FinalizerAction::Release
        );
        // Clock skew: a deletion "in the future" waits the full timeout.
        assert!(matches!(
            decide(&profile(true, Some(50)), &nodes, &reports, t(0), timeout),
            FinalizerAction::Wait { .. }
        ));
    }
}
