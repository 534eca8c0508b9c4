//! Building the node's `NodeTuningReport` status from one pass, pure, and deciding whether it is
//! worth writing.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::tcp::TimeWaitStatus;
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
    /// TIME_WAIT against its cap, when the sockets could be counted.
    pub time_wait: Option<&'a TimeWaitStatus>,
    pub now: Time,
}

impl<'a> PassFacts<'a> {
    /// A pass that matched no profile, wrote nothing and counted nothing, at `now`: the start
    /// that a caller with little to say (a test, mostly) fills in with struct-update syntax.
    pub fn idle(merged: &'a Merged, now: Time) -> Self {
        PassFacts {
            kernel_release: "",
            matched: &[],
            merged,
            results: &[],
            restored: &[],
            held_originals: vec![],
            drift_corrections: 0,
            warnings: vec![],
            tcp: None,
            ledger_problem: None,
            time_wait: None,
            now,
        }
    }
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
    let failed: Vec<&KeyResult> = f.results.iter().filter(|r| r.is_failure()).collect();
    let applied = f
        .results
        .iter()
        .filter(|r| matches!(r.state, KeyState::Applied | KeyState::DryRun))
        .count();
    let profiles = applied_profiles(f);
    let (conditions, warnings) = conditions_and_warnings(f, &failed, applied);
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
        sysctls: sysctl_entries(f),
        pod_sysctls: Vec::new(),
        held_originals: f.held_originals.clone(),
        drift_corrections: f.drift_corrections as i64,
        warnings,
        tcp: tcp_counts(f.tcp).unwrap_or_default(),
        sockstat: sockstat_summary(f).unwrap_or_default(),
        conditions,
        last_report_time: Some(f.now.clone()),
        ..Default::default()
    }
}

/// One entry per key: enforced and previewed results, keys lost to a higher-priority profile,
/// restored keys, and pod-targeting profiles' keys the host merge leaves out.
fn sysctl_entries(f: &PassFacts<'_>) -> Vec<SysctlEntry> {
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
    // `execute` returns the DryRun previews last; a preview shares its key with the enforced
    // entry, so its profile comes from its position.
    let main = f.results.len().saturating_sub(f.merged.previews.len());
    let (enforced, previews) = f.results.split_at(main);
    let mut sysctls: Vec<SysctlEntry> = enforced
        .iter()
        .map(|r| entry(r, profile_of(&r.key)))
        .chain(
            previews
                .iter()
                .zip(f.merged.previews.values())
                .map(|(r, d)| entry(r, Some(d.profile.clone()))),
        )
        .collect();
    sysctls.extend(f.merged.overridden.iter().map(overridden_entry));
    sysctls.extend(f.restored.iter().map(|r| entry(r, None)));
    // The host merge leaves pod-targeting profiles out; say so per key instead of silence.
    sysctls.extend(crate::podtune::not_handled(
        f.matched,
        crate::podtune::summary::NOT_HANDLED_YET,
    ));
    sysctls
}

fn overridden_entry(o: &crate::plan::Overridden) -> SysctlEntry {
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
}

fn applied_profiles(f: &PassFacts<'_>) -> Vec<AppliedProfile> {
    f.matched
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            AppliedProfile {
                overridden_keys: f.merged.overridden_keys_of(&name),
                name,
                generation: p.metadata.generation.unwrap_or_default(),
                mode: p.spec.mode,
                revision: None,
            }
        })
        .collect()
}

fn tcp_counts(tcp: Option<&TcpSnapshot>) -> Option<TcpCounts> {
    tcp.map(|s| TcpCounts {
        source: s.source.as_str().to_string(),
        ipv4: s.ipv4.to_map(),
        ipv6: s.ipv6.to_map(),
        total: s.total.to_map(),
    })
}

fn sockstat_summary(f: &PassFacts<'_>) -> Option<SockstatSummary> {
    f.tcp.map(|s| SockstatSummary {
        time_wait: s.sockstat.tcp_tw as i64,
        max_tw_buckets: s.sockstat.tcp_max_tw_buckets as i64,
        orphans: s.sockstat.tcp_orphan as i64,
        inuse: s.sockstat.tcp_inuse as i64,
        local_port_range: format!(
            "{} {}",
            s.sockstat.ip_local_port_range.low, s.sockstat.ip_local_port_range.high
        ),
        time_wait_overflows: f
            .time_wait
            .and_then(|t| t.overflows)
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
    })
}

/// Ready/Stalled/Degraded from the ledger and the failed keys, then TimeWaitPressure; the
/// warnings gain the TIME_WAIT pressure.
fn conditions_and_warnings(
    f: &PassFacts<'_>,
    failed: &[&KeyResult],
    applied: usize,
) -> (
    Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    Vec<String>,
) {
    // The report has no spec worth a generation: observedGeneration stays unset. Transition
    // times are carried over from the last written report by the writer.
    let b = Builder::new(&[], None, f.now.0);
    let mut conditions = match (f.ledger_problem, failed.is_empty()) {
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
        (None, false) => {
            let failed_list = bounded_list(
                &failed
                    .iter()
                    .map(|r| format!("{}: {:?}", r.key, r.state))
                    .collect::<Vec<_>>(),
                conditions::MAX_MESSAGE,
            );
            vec![
                b.make(Type::Ready, false, Reason::KeysFailed, failed_list.clone()),
                b.make(Type::Stalled, true, Reason::KeysFailed, failed_list.clone()),
                b.make(Type::Degraded, true, Reason::KeysFailed, failed_list),
            ]
        }
    };
    let mut warnings = f.warnings.clone();
    if let Some(tw) = f.time_wait {
        conditions.push(time_wait_condition(&b, tw));
        warnings.extend(tw.pressure.iter().cloned());
    }
    (conditions, warnings)
}

/// `TimeWaitPressure`: a warning beside Ready, never instead of it.
fn time_wait_condition(
    b: &Builder<'_>,
    tw: &TimeWaitStatus,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    if tw.pressure.is_empty() {
        b.make(
            Type::TimeWaitPressure,
            false,
            Reason::TimeWaitHeadroom,
            String::new(),
        )
    } else {
        b.make(
            Type::TimeWaitPressure,
            true,
            Reason::TimeWaitPressure,
            tw.pressure.join("; "),
        )
    }
}

/// The report an agent leaves when it stops on a node no profile selects and whose ledger is
/// empty: the controller is withdrawing it, so nothing will update the report. The TCP figures
/// are cleared instead of staying frozen and looking live, and the conditions say why. Returns
/// false (status untouched) when the node still has profiles or originals: then the agent is
/// only being replaced and its successor carries on.
pub fn mark_withdrawn(status: &mut NodeTuningReportStatus) -> bool {
    if !status.profiles.is_empty() || !status.held_originals.is_empty() {
        return false;
    }
    status.tcp = TcpCounts::default();
    status.sockstat = SockstatSummary::default();
    status.pods = None;
    let why = "no profile selects this node: its agent stopped and this report is no longer \
               updated (TCP counts cleared; they come back with the next profile)";
    status.warnings.push(why.to_string());
    let now = status
        .last_report_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let b = Builder::new(&[], None, now);
    status.conditions = vec![
        b.make(Type::Ready, true, Reason::AgentWithdrawn, why.to_string()),
        b.make(Type::Stalled, false, Reason::AgentWithdrawn, String::new()),
        b.make(Type::Degraded, false, Reason::AgentWithdrawn, String::new()),
    ];
    true
}

// The write policy is shared with the controller (crate::status_write); kept under these names
// so agent/writer.rs reads as before.
pub use crate::status_write::{StatusChange as Change, classify as change};

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
    use crate::api::Scope;

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
        let sysctls: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "1")).collect();
        NodeTuningProfile::test(name)
            .with_sysctls(&sysctls)
            .with_priority(priority)
            .with_generation(2)
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
            matched: &matched,
            results: &results,
            held_originals: vec!["net.ipv4.tcp_tw_reuse".into()],
            drift_corrections: 1,
            ..PassFacts::idle(&merged, ts(100))
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
    fn a_pod_targeting_profile_is_reported_per_key_not_applied_to_the_host() {
        let host = profile("host", 0, &["net.ipv4.tcp_fin_timeout"]);
        let mut pods = profile("pods", 9, &["net.ipv4.tcp_fin_timeout"]);
        pods.spec.pod_selector =
            crate::selector::from_pairs(&["app.kubernetes.io/name=squid".into()]).expect("pair");
        let matched = [&host, &pods];
        let merged = crate::plan::merge(matched);
        assert_eq!(merged.desired["net.ipv4.tcp_fin_timeout"].profile, "host");
        let results = [result("net.ipv4.tcp_fin_timeout", KeyState::Applied)];
        let s = build_status(&PassFacts {
            matched: &matched,
            results: &results,
            ..PassFacts::idle(&merged, ts(100))
        });
        let of = |p: &str| -> Vec<(KeyState, String)> {
            s.sysctls
                .iter()
                .filter(|e| e.profile.as_deref() == Some(p))
                .map(|e| (e.state, e.message.clone().unwrap_or_default()))
                .collect()
        };
        assert_eq!(of("host"), vec![(KeyState::Applied, String::new())]);
        let pod_entries = of("pods");
        assert_eq!(pod_entries.len(), 1, "{pod_entries:?}");
        assert_eq!(pod_entries[0].0, KeyState::Unsupported);
        assert!(
            pod_entries[0].1.contains("pod-targeting"),
            "{pod_entries:?}"
        );
    }

    /// The agent's whole pass on a fake /proc/sys (here rather than in the agent module, whose
    /// pass this only observes): a pod-targeting profile writes nothing on the host, records
    /// nothing in the ledger, and its key is in the report with why.
    #[test]
    fn the_agent_pass_leaves_the_host_alone_for_a_pod_profile() {
        use std::sync::Arc;
        let proc_sys = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fin = proc_sys.path().join("net/ipv4/tcp_fin_timeout");
        std::fs::create_dir_all(fin.parent().expect("parent")).expect("mkdir");
        std::fs::write(&fin, "60\n").expect("write");
        let args = super::super::AgentArgs::for_tests("node-a", state.path(), proc_sys.path());
        let metrics = Arc::new(super::super::AgentMetrics::default());
        let mut node = super::super::NodeSide::open(&args, metrics).expect("open");
        let mut squid = profile("squid", 0, &["net.ipv4.tcp_fin_timeout"]);
        squid.spec.pod_selector =
            crate::selector::from_pairs(&["app.kubernetes.io/name=squid".into()]).expect("pair");
        let cached = [Arc::new(kube::core::DeserializeGuard(Ok(squid)))];
        let status = node.pass(&Default::default(), &cached);
        assert_eq!(std::fs::read_to_string(&fin).expect("read"), "60\n");
        assert!(status.held_originals.is_empty(), "{status:?}");
        let entry = status
            .sysctls
            .iter()
            .find(|e| e.key == "net.ipv4.tcp_fin_timeout")
            .expect("the key is reported");
        assert_eq!(
            (entry.profile.as_deref(), entry.state),
            (Some("squid"), KeyState::Unsupported)
        );
    }

    #[test]
    fn change_classifies_timestamps_telemetry_and_state() {
        let merged = Merged::default();
        let facts = |now, drift| PassFacts {
            drift_corrections: drift,
            ..PassFacts::idle(&merged, now)
        };
        let a = build_status(&facts(ts(1), 0));
        let mut b = build_status(&facts(ts(2), 0));
        assert_eq!(change(None, &a), Change::State);
        assert_eq!(change(Some(&a), &b), Change::Unchanged);
        b.tcp.total.insert("TIME_WAIT".into(), 5);
        assert_eq!(change(Some(&a), &b), Change::Telemetry);
        let mut pods = build_status(&facts(ts(2), 0));
        pods.pods = Some(crate::api::PodsTcp {
            time_wait: 1_478,
            ..Default::default()
        });
        assert_eq!(change(Some(&a), &pods), Change::Telemetry);
        let c = build_status(&facts(ts(3), 1));
        assert_eq!(change(Some(&a), &c), Change::State);
        let mut d = build_status(&facts(ts(9), 0));
        carry_transition_times(Some(&a), &mut d);
        assert_eq!(d.conditions[0].last_transition_time, ts(1));
        assert!(crate::conditions::is_true(&d.conditions, Type::Ready));
        assert!(!crate::conditions::is_true(&d.conditions, Type::Stalled));
    }

    /// Issue 17 item 16: after the last profile went, the withdrawn agent's report kept TCP
    /// counts that looked live.
    #[test]
    fn a_withdrawn_agent_clears_its_tcp_counts_and_says_so() {
        let merged = Merged::default();
        let facts = PassFacts::idle(&merged, ts(5));
        let mut last = build_status(&facts);
        last.tcp.total.insert("TIME_WAIT".into(), 700);
        last.sockstat.time_wait = 700;
        let mut s = last.clone();
        assert!(mark_withdrawn(&mut s));
        assert!(s.tcp.total.is_empty() && s.sockstat.time_wait == 0);
        let ready = crate::conditions::find(&s.conditions, Type::Ready).expect("Ready");
        assert_eq!(ready.reason, "AgentWithdrawn");
        assert!(s.warnings.iter().any(|w| w.contains("no longer updated")));
        // Written at once, not at the next heartbeat (there is none).
        assert_eq!(change(Some(&last), &s), Change::State);

        // A node that still holds originals (or profiles) is only changing agents.
        let mut held = last.clone();
        held.held_originals = vec!["net.ipv4.tcp_fin_timeout".into()];
        assert!(!mark_withdrawn(&mut held));
        assert_eq!(held.tcp.total["TIME_WAIT"], 700);
    }
}
