//! Which revision of each profile this node runs. A profile with `spec.rollout` is applied at
//! the revision the controller assigned to the node (the Node annotation
//! `nodetune.dev/revisions`), else at its stable revision (the last that finished: a node that
//! joins mid-rollout waits for its wave); a profile without `spec.rollout`, or without any
//! recorded revision yet, is applied as its spec says (the behaviour without rollouts).
use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::PartialObjectMeta;

use crate::api::NodeTuningProfile;
use crate::api::NodeTuningReportStatus;
use crate::api::rollout::{REVISIONS_ANNOTATION, parse_assignments};

/// Profile name to assigned revision, from the node's annotation (unreadable: none).
pub fn assignments(node: &PartialObjectMeta<Node>) -> BTreeMap<String, i64> {
    parse_assignments(
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISIONS_ANNOTATION))
            .map(String::as_str),
    )
}

/// The revision `profile` runs on this node, and its number; `None` when the spec applies as
/// it is.
fn pick(profile: &NodeTuningProfile, assigned: &BTreeMap<String, i64>) -> Option<(i64, usize)> {
    profile.spec.rollout.as_ref()?;
    let rollout = profile.status.as_ref()?.rollout.as_ref()?;
    let name = profile.metadata.name.as_deref().unwrap_or_default();
    let find = |n: i64| rollout.revisions.iter().position(|r| r.number == n);
    // An assignment to a revision no longer in the history falls back to the stable one.
    let wanted = assigned
        .get(name)
        .copied()
        .and_then(|n| find(n).map(|i| (n, i)));
    wanted.or_else(|| {
        rollout
            .stable_revision
            .and_then(|n| find(n).map(|i| (n, i)))
    })
}

/// The profiles as this node must apply them: a rolled-out profile's `sysctls` and `mode`
/// replaced by those of its node's revision. Profiles without a rollout are borrowed as is.
pub fn select<'p>(
    profiles: &[&'p NodeTuningProfile],
    assigned: &BTreeMap<String, i64>,
) -> Vec<Cow<'p, NodeTuningProfile>> {
    profiles
        .iter()
        .map(|p| match pick(p, assigned) {
            None => Cow::Borrowed(*p),
            Some((_, at)) => {
                let mut p = (*p).clone();
                if let Some(r) = p
                    .status
                    .as_ref()
                    .and_then(|s| s.rollout.as_ref())
                    .and_then(|s| s.revisions.get(at))
                {
                    p.spec.sysctls = r.sysctls.clone();
                    p.spec.mode = r.mode;
                }
                Cow::Owned(p)
            }
        })
        .collect()
}

/// Writes, in the report, the revision each rolled-out profile runs at on this node.
pub fn annotate(
    status: &mut NodeTuningReportStatus,
    profiles: &[&NodeTuningProfile],
    assigned: &BTreeMap<String, i64>,
) {
    for applied in &mut status.profiles {
        applied.revision = profiles
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(applied.name.as_str()))
            .and_then(|p| pick(p, assigned))
            .map(|(n, _)| n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::rollout::{Revision, RolloutSpec, RolloutStatus};
    use crate::api::{AppliedProfile, NodeTuningProfileSpec, NodeTuningProfileStatus};

    fn values(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("net.core.somaxconn".to_string(), v.to_string())])
    }

    fn rolled_out(spec_value: &str, stable: Option<i64>) -> NodeTuningProfile {
        let mut p = NodeTuningProfile::new(
            "web",
            NodeTuningProfileSpec {
                sysctls: values(spec_value),
                rollout: Some(RolloutSpec::default()),
                ..Default::default()
            },
        );
        p.status = Some(NodeTuningProfileStatus {
            rollout: Some(RolloutStatus {
                revisions: vec![
                    Revision {
                        number: 1,
                        sysctls: values("4096"),
                        ..Default::default()
                    },
                    Revision {
                        number: 2,
                        sysctls: values("128"),
                        ..Default::default()
                    },
                ],
                current_revision: 2,
                stable_revision: stable,
                ..Default::default()
            }),
            ..Default::default()
        });
        p
    }

    fn value_of(p: &NodeTuningProfile) -> &str {
        &p.spec.sysctls["net.core.somaxconn"]
    }

    #[test]
    fn the_assigned_revision_else_the_stable_one() {
        let p = rolled_out("128", Some(1));
        let none = BTreeMap::new();
        assert_eq!(value_of(&select(&[&p], &none)[0]), "4096", "joins: stable");
        let two = BTreeMap::from([("web".to_string(), 2)]);
        assert_eq!(value_of(&select(&[&p], &two)[0]), "128");
        let gone = BTreeMap::from([("web".to_string(), 7)]);
        assert_eq!(value_of(&select(&[&p], &gone)[0]), "4096", "pruned: stable");
        let mut status = NodeTuningReportStatus {
            profiles: vec![AppliedProfile {
                name: "web".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        annotate(&mut status, &[&p], &two);
        assert_eq!(status.profiles[0].revision, Some(2));
    }

    #[test]
    fn without_a_rollout_the_spec_applies_as_today() {
        let mut p = rolled_out("128", Some(1));
        p.spec.rollout = None;
        let two = BTreeMap::from([("web".to_string(), 1)]);
        let picked = select(&[&p], &two);
        assert!(matches!(picked[0], Cow::Borrowed(_)));
        assert_eq!(value_of(&picked[0]), "128");
        // A rollout with no history yet (the controller has not recorded one): the spec.
        let mut fresh = rolled_out("512", None);
        fresh.status = None;
        assert_eq!(value_of(&select(&[&fresh], &BTreeMap::new())[0]), "512");
    }

    #[test]
    fn a_hostile_annotation_is_no_assignment() {
        let mut node = PartialObjectMeta::<Node>::default();
        node.metadata.annotations = Some(BTreeMap::from([(
            REVISIONS_ANNOTATION.to_string(),
            "[1,2".to_string(),
        )]));
        assert!(assignments(&node).is_empty());
        node.metadata.annotations = Some(BTreeMap::from([(
            REVISIONS_ANNOTATION.to_string(),
            r#"{"web":2}"#.to_string(),
        )]));
        assert_eq!(assignments(&node)["web"], 2);
    }
}
