//! What the controller keeps of each watched object. Reports are most of its memory at scale
//! (one per node, tens of keys each), so only what the roll-up, the label plan and the finalizer
//! read is cached: profile outcomes, failing keys with their messages, the winners of overridden
//! keys, TCP totals, the report time and whether originals are held. Of Nodes, the name and labels.
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Node;
use kube::api::PartialObjectMeta;

use crate::api::NodeTuningReport;

/// Trim a Node's metadata for the controller's cache: only its name and labels are read (the
/// selection and the agent label). Real nodes carry annotations from the kubelet, the CNI and
/// CSI drivers (often a kilobyte or more each), which at 20,000 nodes would be tens of MiB.
pub fn trim_node(n: &mut PartialObjectMeta<Node>) {
    // Of the annotations, only the rollout's revision assignments (controller::rollout).
    let key = crate::api::rollout::REVISIONS_ANNOTATION;
    n.metadata.annotations = n
        .metadata
        .annotations
        .take()
        .and_then(|mut a| a.remove_entry(key))
        .map(|kv| std::collections::BTreeMap::from([kv]));
    n.metadata.owner_references = None;
    n.metadata.finalizers = None;
}

/// Trim a report for the controller's cache (in place, before it is stored).
pub fn trim_report(r: &mut NodeTuningReport) {
    r.metadata.annotations = None;
    r.metadata.labels = None;
    let Some(s) = r.status.as_mut() else { return };
    // The winner of an overridden key is looked up by key: keep those entries.
    let overridden: BTreeSet<&str> = s
        .profiles
        .iter()
        .flat_map(|p| p.overridden_keys.iter().map(String::as_str))
        .collect();
    let keep: Vec<bool> = s
        .sysctls
        .iter()
        .map(|e| e.is_failure() || overridden.contains(e.key.as_str()))
        .collect();
    let mut keep = keep.into_iter();
    s.sysctls.retain(|_| keep.next().unwrap_or(false));
    for e in &mut s.sysctls {
        e.desired = None;
        e.actual = None;
        e.original = None;
    }
    // Only "holds something or not" is read (the label stays while an agent has originals).
    s.held_originals.truncate(1);
    s.warnings = Vec::new();
    // The roll-up reads one condition of a report: whether TimeWaitPressure is True.
    s.conditions.retain(|c| {
        c.type_ == crate::conditions::Type::TimeWaitPressure.as_str() && c.status == "True"
    });
    for c in &mut s.conditions {
        c.message = String::new();
    }
    s.tcp.ipv4 = Default::default();
    s.tcp.ipv6 = Default::default();
    // TIME_WAIT against its cap stays: a rollout's headroom guard reads it.
    s.sockstat = crate::api::SockstatSummary {
        time_wait: s.sockstat.time_wait,
        max_tw_buckets: s.sockstat.max_tw_buckets,
        ..Default::default()
    };
    s.kernel_release = String::new();
    s.summary = Default::default();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::{KeyState, Scope, SysctlEntry};
    use crate::controller::labels::tests::report;
    use crate::controller::labels::{NodeLabels, nothing_to_restore};
    use crate::controller::rollup::rollup;

    fn entry(key: &str, profile: &str, state: KeyState) -> SysctlEntry {
        SysctlEntry {
            key: key.into(),
            desired: Some("1".into()),
            actual: Some("1".into()),
            original: Some("0".into()),
            profile: Some(profile.into()),
            scope: Scope::NetworkNamespace,
            optional: false,
            state,
            message: Some(format!("{key} message")),
        }
    }

    #[test]
    fn a_trimmed_node_keeps_its_name_and_labels() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname".to_string(), "n1".to_string()),
            ("role".to_string(), "web".to_string()),
        ]
        .into();
        let mut n = PartialObjectMeta::<Node> {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some("42".into()),
                labels: Some(labels.clone()),
                annotations: Some(
                    [(
                        "csi.volume.kubernetes.io/nodeid".to_string(),
                        "{\"ebs.csi.aws.com\":\"i-0123\"}".to_string(),
                    )]
                    .into(),
                ),
                finalizers: Some(vec!["example.com/hold".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        trim_node(&mut n);
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
        assert_eq!(n.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(n.metadata.labels, Some(labels));
        assert_eq!(n.metadata.annotations, None);
        assert_eq!(n.metadata.finalizers, None);
    }

    #[test]
    fn the_roll_up_and_the_label_plan_read_the_same_from_a_trimmed_report() {
        let mut full = report("n1", &["web", "fast"], &["a", "b", "c"]);
        if let Some(s) = full.status.as_mut() {
            s.profiles[0].overridden_keys = vec!["net.ipv4.tcp_fin_timeout".into()];
            s.sysctls = vec![
                entry("net.ipv4.tcp_fin_timeout", "fast", KeyState::Applied),
                entry("net.ipv4.tcp_tw_reuse", "web", KeyState::Applied),
                entry("net.ipv4.tcp_tw_recycle", "web", KeyState::Unsupported),
            ];
            s.tcp.total = [("TIME_WAIT".to_string(), 7)].into();
            s.tcp.ipv4 = s.tcp.total.clone();
            s.warnings = vec!["w".into()];
            // TIME_WAIT pressure reaches the profile from the trimmed copy too.
            let b = crate::conditions::Builder::new(&[], None, Timestamp::UNIX_EPOCH);
            s.conditions = vec![
                b.make(
                    crate::conditions::Type::Ready,
                    true,
                    crate::conditions::Reason::AllKeysApplied,
                    "3 keys applied".into(),
                ),
                b.make(
                    crate::conditions::Type::TimeWaitPressure,
                    true,
                    crate::conditions::Reason::TimeWaitPressure,
                    "at the cap".into(),
                ),
            ];
        }
        let mut trimmed = full.clone();
        trim_report(&mut trimmed);
        let kept: Vec<&str> = trimmed
            .status
            .iter()
            .flat_map(|s| s.sysctls.iter().map(|e| e.key.as_str()))
            .collect();
        assert_eq!(
            kept,
            ["net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_recycle"]
        );
        assert!(
            serde_json::to_vec(&trimmed).expect("json").len()
                < serde_json::to_vec(&full).expect("json").len()
        );

        let nodes: NodeLabels =
            crate::plan::owned_node_labels([("n1".to_string(), BTreeMap::new())]);
        let mut web = crate::api::NodeTuningProfile::new("web", Default::default());
        web.metadata.generation = Some(1);
        let selection = crate::plan::selection([&web], &nodes);
        let now = Timestamp::UNIX_EPOCH;
        let of = |r: &NodeTuningReport| {
            let reports = [("n1".to_string(), r)].into();
            rollup(&web, None, &selection["web"], &reports, now)
        };
        assert_eq!(of(&full), of(&trimmed));
        assert_eq!(
            nothing_to_restore(Some(&full)),
            nothing_to_restore(Some(&trimmed))
        );
    }
}
