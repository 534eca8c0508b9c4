//! Building the node's `NodeTuningReport` status from one pass, pure, and deciding whether it is
//! worth writing.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    AppliedProfile, KeyState, NodeTuningProfile, NodeTuningReportStatus, ReportSummary,
    SockstatSummary, SysctlEntry, TcpCounts,
};
use crate::conditions::{self, Builder, Reason, Type};
use crate::plan::Merged;
use crate::sysctl::KeyResult;
use crate::tcpstat::TcpSnapshot;
use crate::text::bounded_list;

/// Everything one pass found, borrowed from the agent's state.
pub struct PassFacts<'a> {
    pub kernel_release: &'a str,
    pub matched: &'a [&'a NodeTuningProfile],
    pub merged: &'a Merged,
    /// Outcome per winning or rejected key.
    pub results: &'a [KeyResult],
    /// Keys put back because no profile wants them any more.
    pub restored: &'a [KeyResult],
    pub held_originals: Vec<String>,
    pub drift_corrections: u64,
    pub warnings: Vec<String>,
    pub tcp: Option<&'a TcpSnapshot>,
    /// Why nothing was written, when the ledger cannot be trusted.
    pub ledger_problem: Option<&'a str>,
    pub now: Time,
}

/// A value as the report shows it: whitespace runs as one space, so the kernel's tabs
/// (`32768\t65000`) and a profile's spaces (`32768 65000`) read the same in `kubectl describe`
/// (they compare equal too, `sysctl::value::same`).
fn shown(v: &Option<String>) -> Option<String> {
    v.as_deref().map(crate::sysctl::value::normalize)
}

fn entry(r: &KeyResult, profile: Option<String>) -> SysctlEntry {
    SysctlEntry {
        key: r.key.clone(),
        desired: shown(&r.desired),
        actual: shown(&r.actual),
        original: shown(&r.original),
        profile,
        scope: r.scope,
        optional: r.optional,
        state: r.state,
        message: r.message.clone(),
    }
}

pub fn build_status(f: &PassFacts<'_>) -> NodeTuningReportStatus {
    let profile_of = |key: &str| {
        f.merged
            .desired
            .get(key)
            .map(|d| d.profile.clone())
            .or_else(|| {
                f.merged
                    .rejected
                    .iter()
                    .find(|r| r.key == key)
                    .map(|r| r.profile.clone())
            })
    };
    let mut sysctls: Vec<SysctlEntry> = f
        .results
        .iter()
        .map(|r| entry(r, profile_of(&r.key)))
        .collect();
    sysctls.extend(f.merged.overridden.iter().map(|o| {
        SysctlEntry {
            key: o.key.clone(),
            desired: Some(o.value.clone()),
            actual: None,
            original: None,
            profile: Some(o.profile.clone()),
            scope: crate::sysctl::SysctlKey::parse(&o.key)
                .map(|k| k.scope())
                .unwrap_or(crate::api::Scope::Node),
            optional: false,
            state: KeyState::Overridden,
            message: Some(format!("overridden by profile {}", o.winner)),
        }
    }));
    sysctls.extend(f.restored.iter().map(|r| entry(r, None)));

    let failed: Vec<&KeyResult> = f.results.iter().filter(|r| r.is_failure()).collect();
    let applied = f
        .results
        .iter()
        .filter(|r| matches!(r.state, KeyState::Applied | KeyState::DryRun))
        .count();
    let profiles: Vec<AppliedProfile> = f
        .matched
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            AppliedProfile {
                overridden_keys: f.merged.overridden_keys_of(&name),
                name,
                generation: p.metadata.generation.unwrap_or_default(),
                mode: p.spec.mode,
            }
        })
        .collect();
    let tcp = f.tcp.map(|s| TcpCounts {
        source: s.source.as_str().to_string(),
        ipv4: s.ipv4.to_map(),
        ipv6: s.ipv6.to_map(),
        total: s.total.to_map(),
    });
    let sockstat = f.tcp.map(|s| SockstatSummary {
        time_wait: s.sockstat.tcp_tw as i64,
        max_tw_buckets: s.sockstat.tcp_max_tw_buckets as i64,
        orphans: s.sockstat.tcp_orphan as i64,
        inuse: s.sockstat.tcp_inuse as i64,
        local_port_range: format!(
            "{} {}",
            s.sockstat.ip_local_port_range.low, s.sockstat.ip_local_port_range.high
        ),
    });
    let failed_list = bounded_list(
        &failed
            .iter()
            .map(|r| format!("{}: {:?}", r.key, r.state))
            .collect::<Vec<_>>(),
        conditions::MAX_MESSAGE,
    );
    // The report has no spec worth a generation: observedGeneration stays unset. Transition
    // times are carried over from the last written report by the writer.
    let b = Builder::new(&[], None, f.now.0);
    let conditions = match (f.ledger_problem, failed.is_empty()) {
        (Some(why), _) => vec![
            b.make(Type::Ready, false, Reason::LedgerUnusable, why.to_string()),
            b.make(Type::Stalled, true, Reason::LedgerUnusable, why.to_string()),
            b.make(
                Type::Degraded,
                true,
                Reason::LedgerUnusable,
                why.to_string(),
            ),
        ],
        (None, true) => vec![
            b.make(
                Type::Ready,
                true,
                Reason::AllKeysApplied,
                format!("{applied} keys applied"),
            ),
            b.make(Type::Stalled, false, Reason::NoFailures, String::new()),
            b.make(Type::Degraded, false, Reason::NoFailures, String::new()),
        ],
        (None, false) => vec![
            b.make(Type::Ready, false, Reason::KeysFailed, failed_list.clone()),
            b.make(Type::Stalled, true, Reason::KeysFailed, failed_list.clone()),
            b.make(Type::Degraded, true, Reason::KeysFailed, failed_list),
        ],
    };
    NodeTuningReportStatus {
        kernel_release: f.kernel_release.to_string(),
        summary: ReportSummary {
            profiles: profiles
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            applied: applied as i32,
            failed: failed.len() as i32,
        },
        profiles,
        sysctls,
        held_originals: f.held_originals.clone(),
        drift_corrections: f.drift_corrections as i64,
        warnings: f.warnings.clone(),
        tcp: tcp.unwrap_or_default(),
        sockstat: sockstat.unwrap_or_default(),
        conditions,
        last_report_time: Some(f.now.clone()),
        ..Default::default()
    }
}

/// The status with every timestamp blanked, for comparing two passes.
fn without_times(s: &NodeTuningReportStatus) -> NodeTuningReportStatus {
    let mut s = s.clone();
    s.last_report_time = None;
    conditions::blank_timestamps(&mut s.conditions);
    s
}

/// How the new status differs from the last one written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Only timestamps: write only for a heartbeat.
    None,
    /// Only TCP and sockstat figures: telemetry, written at the heartbeat so a large cluster is
    /// not flooded with writes.
    Telemetry,
    /// Anything about sysctls, profiles or conditions: write now.
    State,
}

pub fn change(old: Option<&NodeTuningReportStatus>, new: &NodeTuningReportStatus) -> Change {
    let Some(old) = old else { return Change::State };
    let (mut a, mut b) = (without_times(old), without_times(new));
    if a == b {
        return Change::None;
    }
    a.tcp = TcpCounts::default();
    b.tcp = TcpCounts::default();
    a.sockstat = SockstatSummary::default();
    b.sockstat = SockstatSummary::default();
    if a == b {
        Change::Telemetry
    } else {
        Change::State
    }
}

/// Keep the transition time of conditions whose status did not change, as Kubernetes expects.
pub fn carry_transition_times(
    old: Option<&NodeTuningReportStatus>,
    new: &mut NodeTuningReportStatus,
) {
    if let Some(old) = old {
        conditions::carry_transition_times(&old.conditions, &mut new.conditions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeTuningProfileSpec, Scope};

    fn ts(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid"))
    }

    fn result(key: &str, state: KeyState) -> KeyResult {
        KeyResult {
            key: key.into(),
            desired: Some("1".into()),
            previous: Some("0".into()),
            actual: Some("1".into()),
            original: Some("0".into()),
            scope: Scope::NetworkNamespace,
            optional: false,
            state,
            changed: true,
            message: None,
        }
    }

    fn profile(name: &str, priority: i32, keys: &[&str]) -> NodeTuningProfile {
        let mut p = NodeTuningProfile::new(
            name,
            NodeTuningProfileSpec {
                sysctls: keys
                    .iter()
                    .map(|k| (k.to_string(), "1".to_string()))
                    .collect(),
                priority,
                ..Default::default()
            },
        );
        p.metadata.generation = Some(2);
        p
    }

    /// Issue 17 item 18: `Actual: 32768<TAB>65000` beside `Desired: 32768 65000`.
    #[test]
    fn values_are_shown_with_whitespace_normalised() {
        let mut r = result("net.ipv4.ip_local_port_range", KeyState::Applied);
        r.desired = Some("32768 65000".into());
        r.actual = Some("32768\t65000".into());
        r.original = Some("32768\t60999".into());
        let e = entry(&r, None);
        assert_eq!(e.desired.as_deref(), Some("32768 65000"));
        assert_eq!(e.actual.as_deref(), Some("32768 65000"));
        assert_eq!(e.original.as_deref(), Some("32768 60999"));
    }

    #[test]
    fn status_names_winners_losers_and_failures() {
        let high = profile("high", 5, &["net.ipv4.tcp_tw_reuse"]);
        let low = profile(
            "low",
            0,
            &["net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_tw_recycle"],
        );
        let matched = [&high, &low];
        let merged = crate::plan::merge(matched);
        let results = [
            result("net.ipv4.tcp_tw_reuse", KeyState::Applied),
            result("net.ipv4.tcp_tw_recycle", KeyState::Unsupported),
        ];
        let s = build_status(&PassFacts {
            kernel_release: "6.18",
            matched: &matched,
            merged: &merged,
            results: &results,
            restored: &[],
            held_originals: vec!["net.ipv4.tcp_tw_reuse".into()],
            drift_corrections: 1,
            warnings: vec![],
            tcp: None,
            ledger_problem: None,
            now: ts(100),
        });
        assert_eq!(s.summary.profiles, "high,low");
        assert_eq!((s.summary.applied, s.summary.failed), (1, 1));
        let low_p = s
            .profiles
            .iter()
            .find(|p| p.name == "low")
            .expect("low listed");
        assert_eq!(
            low_p.overridden_keys,
            vec!["net.ipv4.tcp_tw_reuse".to_string()]
        );
        assert_eq!(low_p.generation, 2);
        let winner = s
            .sysctls
            .iter()
            .find(|e| e.key == "net.ipv4.tcp_tw_reuse" && e.state == KeyState::Applied)
            .expect("winner");
        assert_eq!(winner.profile.as_deref(), Some("high"));
        let loser = s
            .sysctls
            .iter()
            .find(|e| e.state == KeyState::Overridden)
            .expect("loser");
        assert_eq!(loser.profile.as_deref(), Some("low"));
        let degraded = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .expect("cond");
        assert_eq!(degraded.status, "True");
        assert!(
            degraded
                .message
                .contains("net.ipv4.tcp_tw_recycle: Unsupported"),
            "{}",
            degraded.message
        );
        // kstatus: a node with refused keys is Stalled, not Ready.
        assert!(crate::conditions::is_true(&s.conditions, Type::Stalled));
        assert!(!crate::conditions::is_true(&s.conditions, Type::Ready));
    }

    #[test]
    fn change_classifies_timestamps_telemetry_and_state() {
        let merged = Merged::default();
        let facts = |now, drift| PassFacts {
            kernel_release: "6.18",
            matched: &[],
            merged: &merged,
            results: &[],
            restored: &[],
            held_originals: vec![],
            drift_corrections: drift,
            warnings: vec![],
            tcp: None,
            ledger_problem: None,
            now,
        };
        let a = build_status(&facts(ts(1), 0));
        let mut b = build_status(&facts(ts(2), 0));
        assert_eq!(change(None, &a), Change::State);
        assert_eq!(change(Some(&a), &b), Change::None);
        b.tcp.total.insert("TIME_WAIT".into(), 5);
        assert_eq!(change(Some(&a), &b), Change::Telemetry);
        let c = build_status(&facts(ts(3), 1));
        assert_eq!(change(Some(&a), &c), Change::State);
        let mut d = build_status(&facts(ts(9), 0));
        carry_transition_times(Some(&a), &mut d);
        assert_eq!(d.conditions[0].last_transition_time, ts(1));
        assert!(crate::conditions::is_true(&d.conditions, Type::Ready));
        assert!(!crate::conditions::is_true(&d.conditions, Type::Stalled));
    }
}
