//! What the controller keeps of each watched object. Reports are most of its memory at scale
//! (one per node, tens of keys each), so only what the roll-up, the label plan and the finalizer
//! read is cached: profile outcomes, failing keys with their messages, the winners of overridden
//! keys, TCP totals, the report time and whether originals are held.
use std::collections::BTreeSet;

use crate::api::NodeTuningReport;

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
    s.conditions = Vec::new();
    s.tcp.ipv4 = Default::default();
    s.tcp.ipv6 = Default::default();
    s.sockstat = Default::default();
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

        let nodes: NodeLabels = [("n1".to_string(), BTreeMap::new())].into();
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
