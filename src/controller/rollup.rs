//! Per-profile roll-up of the node reports into `NodeTuningProfileStatus`. Pure.
//!
//! The status stays small whatever the cluster size: counts, one TCP state map, at most
//! [`MAX_NODE_SUMMARIES`] node summaries (unhealthy first) and four conditions whose messages are
//! bounded. [`status_changed`] ignores timestamps so the controller only writes real changes.
use std::cmp::Reverse;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::labels::NodeLabels;
use crate::api::profile::MAX_NODE_SUMMARIES;
use crate::api::{
    KeyState, Mode, NodeSummary, NodeTuningProfile, NodeTuningProfileStatus, NodeTuningReport,
};
use crate::selector;
use crate::tcpstat::TcpState;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const CONFLICTED: &str = "Conflicted";

/// Longest condition message; longer lists end with "and N more".
pub const MAX_CONDITION_MESSAGE: usize = 1024;
/// Longest per-node summary message.
pub const MAX_NODE_MESSAGE: usize = 256;

/// How one matched node stands for one profile.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Standing {
    /// Some of this profile's winning keys failed: (key, state, message).
    Failed(Vec<(String, KeyState, Option<String>)>),
    /// No report, or a report for another generation.
    Pending(String),
    /// Current generation applied (or evaluated in DryRun) without failure.
    Applied { dry_run: bool, overridden: usize },
}

impl Standing {
    fn rank(&self) -> u8 {
        match self {
            Self::Failed(_) => 0,
            Self::Pending(_) => 1,
            Self::Applied { .. } => 2,
        }
    }
}

fn standing(
    name: &str,
    generation: i64,
    report: Option<&NodeTuningReport>,
) -> (Standing, Option<i64>) {
    let Some(status) = report.and_then(|r| r.status.as_ref()) else {
        return (
            Standing::Pending("no report from the node's agent yet".into()),
            None,
        );
    };
    let Some(applied) = status.profiles.iter().find(|p| p.name == name) else {
        return (
            Standing::Pending("the node's agent has not picked up this profile yet".into()),
            None,
        );
    };
    if applied.generation != generation {
        return (
            Standing::Pending(format!(
                "the node's agent acted on generation {}, not {generation}",
                applied.generation
            )),
            Some(applied.generation),
        );
    }
    let failed: Vec<(String, KeyState, Option<String>)> = status
        .sysctls
        .iter()
        .filter(|e| e.profile.as_deref() == Some(name) && e.is_failure())
        .map(|e| (e.key.clone(), e.state, e.message.clone()))
        .collect();
    let st = if failed.is_empty() {
        Standing::Applied {
            dry_run: applied.mode == Mode::DryRun,
            overridden: applied.overridden_keys.len(),
        }
    } else {
        Standing::Failed(failed)
    };
    (st, Some(applied.generation))
}

/// The winner of each of this profile's overridden keys on one node: (key, winner).
fn overrides(name: &str, report: Option<&NodeTuningReport>) -> Vec<(String, String)> {
    let Some(status) = report.and_then(|r| r.status.as_ref()) else {
        return vec![];
    };
    let Some(applied) = status.profiles.iter().find(|p| p.name == name) else {
        return vec![];
    };
    applied
        .overridden_keys
        .iter()
        .map(|k| {
            let winner = status
                .sysctls
                .iter()
                .find(|e| &e.key == k)
                .and_then(|e| e.profile.clone())
                .unwrap_or_else(|| "another profile".into());
            (k.clone(), winner)
        })
        .collect()
}

/// Cut `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// `parts` joined by "; ", stopping before `max` bytes with "; and N more".
fn bounded_list(parts: &[String], max: usize) -> String {
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        let sep = if out.is_empty() { "" } else { "; " };
        let rest = parts.len() - i - 1;
        let tail = if rest > 0 {
            format!("; and {rest} more").len()
        } else {
            0
        };
        if out.len() + sep.len() + part.len() + tail > max {
            out.push_str(&format!("{sep}and {} more", parts.len() - i));
            return truncate(out, max);
        }
        out.push_str(sep);
        out.push_str(part);
    }
    out
}

fn nodes_word(n: usize) -> String {
    if n == 1 {
        "1 node".into()
    } else {
        format!("{n} nodes")
    }
}

/// Group counts into "what on N nodes" parts, most frequent first.
fn counted<K: Ord>(counts: BTreeMap<K, usize>, label: impl Fn(&K) -> String) -> Vec<String> {
    let mut v: Vec<(K, usize)> = counts.into_iter().collect();
    v.sort_by_key(|(_, n)| Reverse(*n)); // stable: ties keep key order
    v.iter()
        .map(|(k, n)| format!("{} on {}", label(k), nodes_word(*n)))
        .collect()
}

fn condition(
    previous: Option<&NodeTuningProfileStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: truncate(message, MAX_CONDITION_MESSAGE),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status of `profile` given every node's labels and every node's report. `previous` is
/// the status last seen or written (for lastTransitionTime); `now` stamps new transitions.
pub fn rollup(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    nodes: &NodeLabels,
    reports: &BTreeMap<String, &NodeTuningReport>,
    now: Timestamp,
) -> NodeTuningProfileStatus {
    let name = profile.metadata.name.as_deref().unwrap_or_default();
    let generation = profile.metadata.generation.unwrap_or_default();
    let mut tcp_states: BTreeMap<String, i64> = TcpState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    let mut last_report: Option<Timestamp> = None;
    let mut matched = 0usize;
    let mut applied = 0usize;
    let mut failed = 0usize;
    let mut pending = 0usize;
    let mut failures: BTreeMap<(String, KeyState), usize> = BTreeMap::new();
    let mut conflicts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut standings: Vec<(u8, &str, Standing, Option<i64>)> = Vec::new();
    let mut selector_error = None;

    for (node, labels) in nodes {
        match selector::matches(profile.spec.node_selector.as_ref(), labels) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                selector_error = Some(e.to_string());
                break;
            }
        }
        matched += 1;
        let report = reports.get(node).copied();
        if let Some(status) = report.and_then(|r| r.status.as_ref()) {
            for (state, n) in &status.tcp.total {
                *tcp_states.entry(state.clone()).or_default() += n;
            }
            if let Some(t) = &status.last_report_time {
                last_report = Some(last_report.map_or(t.0, |l| l.max(t.0)));
            }
        }
        for conflict in overrides(name, report) {
            *conflicts.entry(conflict).or_default() += 1;
        }
        let (st, seen_generation) = standing(name, generation, report);
        match &st {
            Standing::Failed(keys) => {
                failed += 1;
                for (key, state, _) in keys {
                    *failures.entry((key.clone(), *state)).or_default() += 1;
                }
            }
            Standing::Pending(_) => pending += 1,
            Standing::Applied { .. } => applied += 1,
        }
        standings.push((st.rank(), node.as_str(), st, seen_generation));
    }
    if selector_error.is_some() {
        (matched, applied, failed, pending) = (0, 0, 0, 0);
        standings.clear();
        failures.clear();
        conflicts.clear();
        tcp_states.values_mut().for_each(|v| *v = 0);
    }

    standings.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    standings.truncate(MAX_NODE_SUMMARIES);
    let summaries = standings
        .into_iter()
        .map(|(_, node, st, seen)| summary(node, st, seen))
        .collect();

    let gen_ = Some(generation);
    let dry_run = profile.spec.mode == Mode::DryRun;
    let verb = if dry_run { "evaluated" } else { "applied" };
    let ready = match (&selector_error, matched, failed) {
        (Some(e), _, _) => condition(
            previous,
            READY,
            false,
            "InvalidSelector",
            e.clone(),
            gen_,
            now,
        ),
        (None, 0, _) => condition(
            previous,
            READY,
            true,
            "NoMatchingNodes",
            "no node matches the selector".into(),
            gen_,
            now,
        ),
        (None, m, _) if applied == m => condition(
            previous,
            READY,
            true,
            if dry_run { "Evaluated" } else { "Applied" },
            format!("{verb} on all {}", nodes_word(m)),
            gen_,
            now,
        ),
        (None, m, f) if f > 0 => condition(
            previous,
            READY,
            false,
            "NodesFailed",
            format!("{verb} on {applied} of {}; failed on {f}", nodes_word(m)),
            gen_,
            now,
        ),
        (None, m, _) => condition(
            previous,
            READY,
            false,
            "NodesPending",
            format!(
                "{verb} on {applied} of {}; waiting for {pending}",
                nodes_word(m)
            ),
            gen_,
            now,
        ),
    };
    let progressing = if pending > 0 {
        condition(
            previous,
            PROGRESSING,
            true,
            "NodesPending",
            format!(
                "{} not yet reported generation {generation}",
                nodes_word(pending)
            ),
            gen_,
            now,
        )
    } else {
        condition(
            previous,
            PROGRESSING,
            false,
            "AllNodesReported",
            String::new(),
            gen_,
            now,
        )
    };
    let degraded = if failed > 0 {
        let parts = counted(failures, |(key, state)| format!("{key}: {state:?}"));
        condition(
            previous,
            DEGRADED,
            true,
            "KeysFailed",
            bounded_list(&parts, MAX_CONDITION_MESSAGE),
            gen_,
            now,
        )
    } else {
        condition(
            previous,
            DEGRADED,
            false,
            "NoFailures",
            String::new(),
            gen_,
            now,
        )
    };
    let conflicted = if conflicts.is_empty() {
        condition(
            previous,
            CONFLICTED,
            false,
            "NoConflicts",
            String::new(),
            gen_,
            now,
        )
    } else {
        let parts = counted(conflicts, |(key, winner)| {
            format!("{key}: overridden by {winner}")
        });
        condition(
            previous,
            CONFLICTED,
            true,
            "KeysOverridden",
            bounded_list(&parts, MAX_CONDITION_MESSAGE),
            gen_,
            now,
        )
    };

    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    NodeTuningProfileStatus {
        observed_generation: gen_,
        conditions: vec![ready, progressing, degraded, conflicted],
        matched_nodes: count(matched),
        applied_nodes: count(applied),
        failed_nodes: count(failed),
        pending_nodes: count(pending),
        tcp_states,
        nodes: summaries,
        last_report_time: last_report.map(Time),
    }
}

fn summary(node: &str, st: Standing, seen_generation: Option<i64>) -> NodeSummary {
    let (state, message) = match st {
        Standing::Failed(keys) => {
            let parts: Vec<String> = keys
                .into_iter()
                .map(|(k, s, m)| match m {
                    Some(m) => format!("{k}: {s:?} ({m})"),
                    None => format!("{k}: {s:?}"),
                })
                .collect();
            ("Failed", Some(bounded_list(&parts, MAX_NODE_MESSAGE)))
        }
        Standing::Pending(why) => ("Pending", Some(why)),
        Standing::Applied { overridden, .. } if overridden > 0 => (
            "Overridden",
            Some(format!(
                "{overridden} key(s) set by a higher-priority profile"
            )),
        ),
        Standing::Applied { dry_run: true, .. } => ("DryRun", None),
        Standing::Applied { .. } => ("Applied", None),
    };
    NodeSummary {
        name: node.into(),
        state: state.into(),
        applied_generation: seen_generation,
        message: message.map(|m| truncate(m, MAX_NODE_MESSAGE)),
    }
}

fn without_timestamps(s: &NodeTuningProfileStatus) -> NodeTuningProfileStatus {
    let mut s = s.clone();
    s.last_report_time = None;
    for c in &mut s.conditions {
        c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
    }
    s
}

/// Whether writing `new` over `old` changes anything but timestamps.
pub fn status_changed(
    old: Option<&NodeTuningProfileStatus>,
    new: &NodeTuningProfileStatus,
) -> bool {
    match old {
        None => true,
        Some(old) => without_timestamps(old) != without_timestamps(new),
    }
}

/// An event worth telling users about, from comparing two statuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

fn cond<'a>(s: Option<&'a NodeTuningProfileStatus>, type_: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn became_true(
    old: Option<&NodeTuningProfileStatus>,
    new: &NodeTuningProfileStatus,
    type_: &str,
) -> Option<String> {
    let now = cond(Some(new), type_).filter(|c| c.status == "True")?;
    let before = cond(old, type_).is_some_and(|c| c.status == "True");
    (!before).then(|| now.message.clone())
}

/// Events for conditions that turned True between `old` and `new`: `Applied` (Ready, with at
/// least one node), `Degraded`, `Conflicted`.
pub fn transitions(
    old: Option<&NodeTuningProfileStatus>,
    new: &NodeTuningProfileStatus,
) -> Vec<Transition> {
    let mut out = Vec::new();
    if new.matched_nodes > 0
        && let Some(note) = became_true(old, new, READY)
    {
        out.push(Transition {
            warning: false,
            reason: "Applied",
            note,
        });
    }
    if let Some(note) = became_true(old, new, DEGRADED) {
        out.push(Transition {
            warning: true,
            reason: "Degraded",
            note,
        });
    }
    if let Some(note) = became_true(old, new, CONFLICTED) {
        out.push(Transition {
            warning: true,
            reason: "Conflicted",
            note,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        AppliedProfile, NodeTuningProfileSpec, NodeTuningReportSpec, NodeTuningReportStatus, Scope,
        SysctlEntry,
    };

    fn profile(name: &str, generation: i64) -> NodeTuningProfile {
        let mut p = NodeTuningProfile::new(
            name,
            NodeTuningProfileSpec {
                node_selector: crate::selector::from_pairs(&["role=web".into()]).expect("pairs"),
                sysctls: [("net.ipv4.tcp_fin_timeout".to_string(), "30".to_string())].into(),
                ..Default::default()
            },
        );
        p.metadata.generation = Some(generation);
        p
    }

    fn web_nodes(n: usize) -> NodeLabels {
        (0..n)
            .map(|i| {
                (
                    format!("node-{i:05}"),
                    [("role".to_string(), "web".to_string())].into(),
                )
            })
            .collect()
    }

    fn entry(key: &str, profile: &str, state: KeyState) -> SysctlEntry {
        SysctlEntry {
            key: key.into(),
            desired: Some("1".into()),
            actual: None,
            original: None,
            profile: Some(profile.into()),
            scope: Scope::NetworkNamespace,
            optional: false,
            state,
            message: None,
        }
    }

    fn report(
        node: &str,
        profiles: &[(&str, i64, &[&str])],
        sysctls: Vec<SysctlEntry>,
        tw: i64,
    ) -> NodeTuningReport {
        let mut r = NodeTuningReport::new(
            node,
            NodeTuningReportSpec {
                node_name: node.into(),
            },
        );
        let mut status = NodeTuningReportStatus {
            profiles: profiles
                .iter()
                .map(|(name, generation, over)| AppliedProfile {
                    name: name.to_string(),
                    generation: *generation,
                    mode: Mode::Enforce,
                    overridden_keys: over.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            sysctls,
            last_report_time: Some(Time(
                Timestamp::from_second(1_700_000_000 + tw).expect("ts"),
            )),
            ..Default::default()
        };
        status.tcp.total = [
            ("TIME_WAIT".to_string(), tw),
            ("ESTABLISHED".to_string(), 1),
        ]
        .into();
        r.status = Some(status);
        r
    }

    fn index(reports: &[NodeTuningReport]) -> BTreeMap<String, &NodeTuningReport> {
        reports
            .iter()
            .map(|r| (r.metadata.name.clone().unwrap_or_default(), r))
            .collect()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("ts")
    }

    fn get<'a>(s: &'a NodeTuningProfileStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn no_matching_nodes_is_ready() {
        let p = profile("web", 1);
        let s = rollup(&p, None, &NodeLabels::new(), &BTreeMap::new(), now());
        assert_eq!(s.matched_nodes, 0);
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "NoMatchingNodes")
        );
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(s.tcp_states.len(), TcpState::ALL.len());
        assert!(s.tcp_states.values().all(|v| *v == 0));
        assert_eq!(s.observed_generation, Some(1));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );
        assert!(
            transitions(None, &s).is_empty(),
            "no Applied event for zero nodes"
        );
    }

    #[test]
    fn counts_and_conditions() {
        let p = profile("web", 2);
        let mut nodes = web_nodes(5);
        nodes.insert("db".into(), [("role".to_string(), "db".to_string())].into());
        let reports = vec![
            report(
                "node-00000",
                &[("web", 2, &[])],
                vec![entry("net.ipv4.tcp_fin_timeout", "web", KeyState::Applied)],
                10,
            ),
            report(
                "node-00001",
                &[("web", 2, &[])],
                vec![
                    entry("net.ipv4.tcp_fin_timeout", "web", KeyState::Applied),
                    entry("net.ipv4.tcp_tw_recycle", "web", KeyState::Unsupported),
                    // Another profile's failure is not ours.
                    entry("vm.swappiness", "other", KeyState::Denied),
                ],
                20,
            ),
            report("node-00002", &[("web", 1, &[])], vec![], 30),
            report("node-00003", &[("other", 1, &[])], vec![], 40),
            report("db", &[("web", 2, &[])], vec![], 1000),
        ];
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!(
            (
                s.matched_nodes,
                s.applied_nodes,
                s.failed_nodes,
                s.pending_nodes
            ),
            (5, 1, 1, 3)
        );
        assert_eq!(s.tcp_states["TIME_WAIT"], 100, "db is not matched");
        assert_eq!(s.tcp_states["ESTABLISHED"], 4);
        assert_eq!(s.tcp_states["LISTEN"], 0);
        assert_eq!(
            s.last_report_time.as_ref().map(|t| t.0.as_second()),
            Some(1_700_000_040)
        );
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NodesFailed")
        );
        assert_eq!(get(&s, PROGRESSING).status, "True");
        let degraded = get(&s, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(
            degraded.message,
            "net.ipv4.tcp_tw_recycle: Unsupported on 1 node"
        );
        let states: Vec<(&str, &str)> = s
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("node-00001", "Failed"),
                ("node-00002", "Pending"),
                ("node-00003", "Pending"),
                ("node-00004", "Pending"),
                ("node-00000", "Applied")
            ]
        );
        assert_eq!(s.nodes[1].applied_generation, Some(1));
    }

    #[test]
    fn all_applied_is_ready_and_emits_applied() {
        let p = profile("web", 1);
        let nodes = web_nodes(2);
        let reports: Vec<_> = nodes
            .keys()
            .map(|n| report(n, &[("web", 1, &[])], vec![], 1))
            .collect();
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Applied")
        );
        let t = transitions(None, &s);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].reason, "Applied");
        assert!(transitions(Some(&s), &s).is_empty());
    }

    #[test]
    fn degraded_message_groups_keys() {
        let p = profile("web", 1);
        let nodes = web_nodes(4);
        let reports: Vec<_> = nodes
            .keys()
            .enumerate()
            .map(|(i, n)| {
                let mut e = vec![entry(
                    "net.ipv4.tcp_tw_recycle",
                    "web",
                    KeyState::Unsupported,
                )];
                if i < 3 {
                    e.push(entry("net.ipv4.tcp_syncookies", "web", KeyState::Invalid));
                }
                report(n, &[("web", 1, &[])], e, 0)
            })
            .collect();
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!(
            get(&s, DEGRADED).message,
            "net.ipv4.tcp_tw_recycle: Unsupported on 4 nodes; net.ipv4.tcp_syncookies: Invalid on 3 nodes"
        );
        let t = transitions(None, &s);
        assert_eq!(t.iter().map(|t| t.reason).collect::<Vec<_>>(), ["Degraded"]);
        assert!(t[0].warning);
    }

    #[test]
    fn conflicts_name_the_winner() {
        let p = profile("web", 1);
        let nodes = web_nodes(3);
        let reports: Vec<_> = nodes
            .keys()
            .map(|n| {
                report(
                    n,
                    &[("web", 1, &["net.ipv4.tcp_fin_timeout"]), ("fast", 4, &[])],
                    vec![entry("net.ipv4.tcp_fin_timeout", "fast", KeyState::Applied)],
                    0,
                )
            })
            .collect();
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        let c = get(&s, CONFLICTED);
        assert_eq!(c.status, "True");
        assert_eq!(
            c.message,
            "net.ipv4.tcp_fin_timeout: overridden by fast on 3 nodes"
        );
        assert_eq!(s.applied_nodes, 3, "an overridden key is not a failure");
        assert!(s.nodes.iter().all(|n| n.state == "Overridden"));
    }

    #[test]
    fn thousands_of_nodes_stay_small() {
        let p = profile("web", 1);
        let nodes = web_nodes(5000);
        let reports: Vec<_> = nodes
            .keys()
            .enumerate()
            .filter(|(i, _)| i % 10 != 0) // 500 without a report
            .map(|(i, n)| {
                let e = if i % 7 == 0 {
                    (0..50)
                        .map(|k| {
                            entry(
                                &format!("net.ipv4.key_{k:02}_{}", "x".repeat(40)),
                                "web",
                                KeyState::Failed,
                            )
                        })
                        .collect()
                } else {
                    vec![]
                };
                report(n, &[("web", 1, &[])], e, 1)
            })
            .collect();
        let idx = index(&reports);
        let s = rollup(&p, None, &nodes, &idx, now());
        assert_eq!(s.matched_nodes, 5000);
        assert_eq!(s.nodes.len(), MAX_NODE_SUMMARIES);
        assert!(s.nodes.iter().all(|n| n.state == "Failed"));
        assert!(s.nodes.windows(2).all(|w| w[0].name < w[1].name));
        assert!(
            s.nodes
                .iter()
                .all(|n| n.message.as_deref().unwrap_or_default().len() <= MAX_NODE_MESSAGE)
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.message.len() <= MAX_CONDITION_MESSAGE)
        );
        assert!(get(&s, DEGRADED).message.contains("more"));
        let size = serde_json::to_string(&s).expect("json").len();
        assert!(size < 16 * 1024, "status is {size} bytes");
    }

    #[test]
    fn timestamps_alone_are_no_change_and_transition_times_are_kept() {
        let p = profile("web", 1);
        let nodes = web_nodes(1);
        let r1 = vec![report("node-00000", &[("web", 1, &[])], vec![], 1)];
        let first = rollup(&p, None, &nodes, &index(&r1), now());
        let later = now() + k8s_openapi::jiff::SignedDuration::from_secs(60);
        let r2 = vec![report("node-00000", &[("web", 1, &[])], vec![], 1)];
        let mut r2 = r2;
        if let Some(s) = r2[0].status.as_mut() {
            s.last_report_time = Some(Time(later));
        }
        let second = rollup(&p, Some(&first), &nodes, &index(&r2), later);
        assert_ne!(first, second, "lastReportTime moved");
        assert!(!status_changed(Some(&first), &second));
        assert_eq!(
            get(&first, READY).last_transition_time,
            get(&second, READY).last_transition_time
        );
        // A real change: the node fails a key.
        let r3 = vec![report(
            "node-00000",
            &[("web", 1, &[])],
            vec![entry("k.x", "web", KeyState::Denied)],
            1,
        )];
        let third = rollup(&p, Some(&second), &nodes, &index(&r3), later);
        assert!(status_changed(Some(&second), &third));
        assert_eq!(get(&third, READY).last_transition_time, Time(later));
        assert_eq!(
            get(&third, CONFLICTED).last_transition_time,
            get(&second, CONFLICTED).last_transition_time
        );
        assert!(status_changed(None, &third));
    }

    #[test]
    fn new_generation_is_pending_until_reported() {
        let p = profile("web", 3);
        let nodes = web_nodes(1);
        let r = vec![report("node-00000", &[("web", 2, &[])], vec![], 1)];
        let s = rollup(&p, None, &nodes, &index(&r), now());
        assert_eq!((s.applied_nodes, s.pending_nodes), (0, 1));
        assert_eq!(get(&s, READY).reason, "NodesPending");
    }

    #[test]
    fn truncation_is_char_safe() {
        let s = truncate("é".repeat(100), 11);
        assert!(s.len() <= 11 && s.ends_with('…'), "{s}");
        assert_eq!(truncate("short".into(), 10), "short");
        let parts: Vec<String> = (0..100).map(|i| format!("part{i}")).collect();
        let b = bounded_list(&parts, 50);
        assert!(b.len() <= 50 && b.ends_with("more"), "{b}");
    }
}
