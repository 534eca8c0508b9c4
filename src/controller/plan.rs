//! One controller pass, decided: from a snapshot of the caches and what this leadership term
//! remembers, the writes to make. Pure: no API calls, no clock, so every decision is tested
//! without a server. [`super::execute`] performs the plan.
//!
//! The order of the plan is the order of the writes: finalizers on new profiles, the agent
//! DaemonSet, node labels and profile statuses (with their Events) side by side, finalizer
//! releases.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::ControllerContext;
use super::cache::Reports;
use super::finalizer::{self, FinalizerAction};
use super::labels::{self, LabelPlan, NodeLabels};
use super::render;
use super::rollup::{self, Transition};
use crate::api::{NodeTuningProfile, NodeTuningProfileStatus};
use crate::duration::format as format_duration;
use crate::status_write::{self, StatusChange};

/// A full pass runs at least this often even without watch events (finalizer timeouts, drift).
pub const RESYNC: Duration = Duration::from_secs(30);

/// The live agent DaemonSet as the cache shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveDaemonSet {
    Absent,
    Present { generation: Option<i64> },
}

/// What the caches hold at the start of a pass (valid objects only).
pub struct Snapshot<'a> {
    /// Sorted by name.
    pub profiles: Vec<&'a NodeTuningProfile>,
    /// Report digests by node name.
    pub reports: Reports,
    pub nodes: NodeLabels<'a>,
    pub daemonset: LiveDaemonSet,
    /// The rollout revisions assigned on Nodes (their `nodetune.dev/revisions` annotation).
    pub assignments: super::rollout::wiring::Assignments,
    /// Soaking nodes whose Node is not Ready (read for them alone), with why.
    pub not_ready: super::rollout::node_ready::NotReady,
    pub now: Timestamp,
}

/// The DaemonSet this term applied, and the generation the apiserver gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedDaemonSet {
    pub rendered: serde_json::Value,
    pub generation: Option<i64>,
}

/// A status this term wrote, and the profile version it was computed from: until the cache
/// shows that version again, the written status is the truth (the cache may lag our write).
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenStatus {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub status: NodeTuningProfileStatus,
    /// When it was written: TCP-only changes wait for the telemetry interval after it.
    pub written_at: Timestamp,
}

/// What one leadership term remembers between passes. A new term starts empty.
#[derive(Clone, Debug, Default)]
pub struct TermMemory {
    pub daemonset: Option<AppliedDaemonSet>,
    /// By profile name.
    pub statuses: HashMap<String, WrittenStatus>,
}

pub use super::writes::FinalizerPatch;

/// The agent DaemonSet to server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonSetApply {
    pub object: DaemonSet,
    pub rendered: serde_json::Value,
}

/// A status patch for one profile, with the Events its transitions call for.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPatch {
    pub profile: String,
    pub object: ObjectReference,
    /// What the status was computed from, remembered once written.
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub status: NodeTuningProfileStatus,
    pub events: Vec<Transition>,
    /// The pass's time, remembered as the write's.
    pub written_at: Timestamp,
}

/// Why a finalizer is released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseCause {
    /// Every node restored or let go of the profile.
    AllRestored,
    /// The timeout passed although these nodes still list the profile.
    TimedOut { holdouts: Vec<String> },
}

/// A finalizer release of a deleted profile, with the note its Event carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    pub patch: FinalizerPatch,
    pub object: ObjectReference,
    pub cause: ReleaseCause,
    pub note: String,
}

/// The writes of one pass, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub add_finalizers: Vec<FinalizerPatch>,
    /// None when the live DaemonSet is what this term last applied.
    pub daemonset: Option<DaemonSetApply>,
    pub labels: LabelPlan,
    pub statuses: Vec<StatusPatch>,
    /// Profiles whose roll-up changed nothing but timestamps, or only TCP totals within the
    /// telemetry interval of this term's last write.
    pub statuses_unchanged: usize,
    pub releases: Vec<Release>,
    /// Rollout revisions to write on Nodes, by profile, once that profile's status is written.
    pub rollout: RolloutWrites,
    /// Live profiles: the memory of anything else is dropped.
    pub live: BTreeSet<String>,
    /// When the next pass is due at the latest.
    pub wake_in: Duration,
}

/// Node annotations of staged rollouts: per profile, node to revision (`None`: removed), and
/// what the touched nodes hold now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutWrites {
    pub by_profile:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<i64>>>,
    pub held: super::rollout::wiring::Assignments,
    /// Entries of profiles that no longer exist, removed whatever else is written.
    pub forget: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<i64>>>,
}

/// How long a TCP-only change must still wait, given this term's last write of the profile.
fn telemetry_wait(
    written_at: Timestamp,
    now: Timestamp,
    ctx: &ControllerContext,
) -> Option<Duration> {
    let elapsed = now.duration_since(written_at);
    let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
    ctx.args
        .timing
        .status_telemetry_interval
        .checked_sub(elapsed)
        .filter(|w| !w.is_zero())
}

/// Decide one pass. `args` gives the DaemonSet settings and the finalizer timeout.
pub fn plan(
    ctx: &ControllerContext,
    snap: &Snapshot<'_>,
    memory: &TermMemory,
) -> Result<Plan, serde_json::Error> {
    let mut plan = Plan {
        wake_in: RESYNC,
        live: snap
            .profiles
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect(),
        ..Default::default()
    };
    plan_added_finalizers(&mut plan, ctx, snap);
    plan.daemonset = plan_daemonset(ctx, snap, memory)?;
    // Node labels and statuses from one evaluation of every selector, over nodes joined to
    // their reports once for every profile's roll-up.
    let joined = rollup::Joined::new(&snap.nodes, &snap.reports);
    let rows = joined.selection(snap.profiles.iter().copied());
    let selection = rows.iter().map(|(p, r)| (*p, joined.names(r))).collect();
    plan.labels = labels::plan_labels(&snap.nodes, &selection, &snap.reports);
    if plan.labels.deferred > 0 {
        // The rest of the label writes go in the next pass, right after this one.
        plan.wake_in = Duration::ZERO;
    }
    plan_statuses(&mut plan, ctx, snap, memory, &selection, (&joined, &rows));
    let names = snap
        .profiles
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    plan.rollout.forget = super::rollout::wiring::forgotten(&snap.assignments, &names);
    for node in plan.rollout.forget.keys() {
        if let Some(held) = snap.assignments.get(node) {
            plan.rollout.held.insert(node.clone(), held.clone());
        }
    }
    plan_releases(&mut plan, ctx, snap);
    Ok(plan)
}

/// Step 1: the cleanup finalizer on live profiles that lack it.
fn plan_added_finalizers(plan: &mut Plan, ctx: &ControllerContext, snap: &Snapshot<'_>) {
    let timeout = ctx.args.timing.finalizer_timeout;
    for p in &snap.profiles {
        if finalizer::decide(p, &snap.nodes, &snap.reports, snap.now, timeout)
            == FinalizerAction::Add
        {
            let mut list = p.metadata.finalizers.clone().unwrap_or_default();
            list.push(finalizer::FINALIZER.into());
            plan.add_finalizers.push(FinalizerPatch::new(p, list));
        }
    }
}

/// Step 2: the agent DaemonSet, unless the live one is what we last applied. Deleting profiles
/// keep their tolerations so their nodes' agents stay to restore.
fn plan_daemonset(
    ctx: &ControllerContext,
    snap: &Snapshot<'_>,
    memory: &TermMemory,
) -> Result<Option<DaemonSetApply>, serde_json::Error> {
    let tolerations = render::toleration_union(
        &ctx.args.agent.default_tolerations.0,
        snap.profiles.iter().copied(),
    );
    let object = render::render_daemonset(ctx, tolerations);
    let rendered = serde_json::to_value(&object)?;
    let up_to_date = match (&memory.daemonset, snap.daemonset) {
        // Same content as last applied, and nobody changed the object since.
        (Some(last), LiveDaemonSet::Present { generation }) => {
            last.rendered == rendered && last.generation == generation
        }
        _ => false,
    };
    Ok((!up_to_date).then_some(DaemonSetApply { object, rendered }))
}

/// Step 3: the status of every live profile, written when it changed (telemetry-only changes
/// at most once per telemetry interval).
fn plan_statuses(
    plan: &mut Plan,
    ctx: &ControllerContext,
    snap: &Snapshot<'_>,
    memory: &TermMemory,
    selection: &std::collections::BTreeMap<&str, crate::plan::Selected<'_>>,
    (joined, rows): (
        &rollup::Joined<'_>,
        &std::collections::BTreeMap<&str, rollup::Rows>,
    ),
) {
    // The live profiles with their selection, rolled up together (one walk over the nodes).
    let mut live = Vec::new();
    for p in snap
        .profiles
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = p.metadata.name.as_deref().unwrap_or_default();
        if let (Some(selected), Some(rows)) = (selection.get(name), rows.get(name)) {
            let input = rollup::RollupInput {
                profile: p,
                previous: previous_status(memory, p),
                rows,
            };
            live.push((input, selected));
        }
    }
    let inputs: Vec<_> = live.iter().map(|(i, _)| *i).collect();
    let statuses = rollup::rollup_all(&inputs, joined, snap.now);
    for ((input, selected), mut status) in live.into_iter().zip(statuses) {
        let (p, previous) = (input.profile, input.previous);
        let name = p.metadata.name.clone().unwrap_or_default();
        let rollout = plan_rollout(plan, p, previous, selected, snap, &mut status);
        let must_write = !rollout.assignments.is_empty();
        if !must_write
            && let Some(wait) = status_deferral(ctx, snap, memory, &name, previous, &status)
        {
            plan.statuses_unchanged += 1;
            plan.wake_in = plan.wake_in.min(wait);
            continue;
        }
        if must_write {
            plan.rollout
                .by_profile
                .insert(name.clone(), rollout.assignments);
        }
        let mut events = rollup::transitions(previous, &status);
        events.extend(rollout.events);
        plan.statuses.push(StatusPatch {
            events,
            object: p.object_ref(&()),
            uid: p.metadata.uid.clone(),
            resource_version: p.metadata.resource_version.clone(),
            profile: name,
            status,
            written_at: snap.now,
        });
    }
}

/// The status `p` had as far as this term knows: our last write, until the cache has caught
/// up with it.
fn previous_status<'a>(
    memory: &'a TermMemory,
    p: &'a NodeTuningProfile,
) -> Option<&'a NodeTuningProfileStatus> {
    match memory
        .statuses
        .get(p.metadata.name.as_deref().unwrap_or_default())
    {
        Some(w) if w.uid == p.metadata.uid && w.resource_version == p.metadata.resource_version => {
            Some(&w.status)
        }
        _ => p.status.as_ref(),
    }
}

/// The staged rollout of `p` (when it has `spec.rollout`), folded into its `status`.
fn plan_rollout(
    plan: &mut Plan,
    p: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    selected: &crate::plan::Selected<'_>,
    snap: &Snapshot<'_>,
    status: &mut NodeTuningProfileStatus,
) -> super::rollout::wiring::Decided {
    use super::rollout::wiring;
    let Ok(nodes) = selected else {
        return wiring::Decided::default();
    };
    let fleet = wiring::Fleet {
        reports: &snap.reports,
        nodes: &snap.nodes,
        assignments: &snap.assignments,
        not_ready: &snap.not_ready,
        now: snap.now,
    };
    let Some(out) = wiring::decide(p, previous, nodes, &fleet) else {
        return wiring::Decided::default();
    };
    let decided = wiring::settle(status, previous, out, snap.now);
    if let Some(w) = decided.wake_in {
        plan.wake_in = plan.wake_in.min(w);
    }
    for node in decided.assignments.keys() {
        if let Some(held) = snap.assignments.get(node) {
            plan.rollout.held.insert(node.clone(), held.clone());
        }
    }
    decided
}

/// Why a profile's status is not written now: `Some(wait)` to look again after `wait`
/// ([`RESYNC`] when nothing changed), `None` to write it.
fn status_deferral(
    ctx: &ControllerContext,
    snap: &Snapshot<'_>,
    memory: &TermMemory,
    name: &str,
    previous: Option<&NodeTuningProfileStatus>,
    status: &NodeTuningProfileStatus,
) -> Option<Duration> {
    match status_write::classify(previous, status) {
        StatusChange::Unchanged => Some(RESYNC),
        // Every heartbeat of every node moves the totals; at thousands of nodes that would be
        // a write per profile per pass. State changes never wait.
        StatusChange::Telemetry => memory
            .statuses
            .get(name)
            .and_then(|w| telemetry_wait(w.written_at, snap.now, ctx)),
        StatusChange::State => None,
    }
}

/// Step 4: the finalizers of deleted profiles whose nodes all restored, or whose timeout
/// passed.
fn plan_releases(plan: &mut Plan, ctx: &ControllerContext, snap: &Snapshot<'_>) {
    let timeout = ctx.args.timing.finalizer_timeout;
    let deleting = snap
        .profiles
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some());
    for p in deleting {
        match finalizer::decide(p, &snap.nodes, &snap.reports, snap.now, timeout) {
            FinalizerAction::Wait { remaining, .. } => {
                plan.wake_in = plan.wake_in.min(remaining + Duration::from_secs(1));
            }
            FinalizerAction::Release => plan.releases.push(Release {
                patch: FinalizerPatch::release(p),
                object: p.object_ref(&()),
                cause: ReleaseCause::AllRestored,
                note: "every node restored or let go of the profile".into(),
            }),
            FinalizerAction::ReleaseTimedOut { nodes } => {
                let note = format!(
                    "released after {} although {} node(s) still list the profile (e.g. {})",
                    format_duration(timeout),
                    nodes.len(),
                    nodes.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                );
                plan.releases.push(Release {
                    patch: FinalizerPatch::release(p),
                    object: p.object_ref(&()),
                    cause: ReleaseCause::TimedOut { holdouts: nodes },
                    note,
                });
            }
            FinalizerAction::Add | FinalizerAction::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeTuningReport;
    use crate::controller::render::AGENT_NODE_LABEL;
    use crate::test_fixtures::nodes;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("ts")
    }

    fn args() -> ControllerContext {
        let mut a = ControllerContext::new(crate::controller::ControllerArgs::defaults());
        a.args.timing.finalizer_timeout = Duration::from_secs(600);
        a
    }

    /// A live profile selecting `role=web`, with the cleanup finalizer, at resourceVersion 7.
    fn web(name: &str) -> NodeTuningProfile {
        NodeTuningProfile::test(name)
            .selecting(&["role=web"])
            .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
            .with_generation(1)
            .stored()
            .with_finalizers(&[finalizer::FINALIZER])
    }

    fn snapshot<'a>(
        profiles: &'a [NodeTuningProfile],
        reports: &'a [NodeTuningReport],
        nodes: NodeLabels<'a>,
        now: Timestamp,
    ) -> Snapshot<'a> {
        Snapshot {
            profiles: profiles.iter().collect(),
            reports: crate::controller::cache::reports_of(reports),
            nodes,
            daemonset: LiveDaemonSet::Absent,
            assignments: Default::default(),
            not_ready: Default::default(),
            now,
        }
    }

    /// The memory after executing `plan` successfully (what the executor records).
    fn remember(memory: &mut TermMemory, plan: &Plan, ds_generation: Option<i64>) {
        if let Some(ds) = &plan.daemonset {
            memory.daemonset = Some(AppliedDaemonSet {
                rendered: ds.rendered.clone(),
                generation: ds_generation,
            });
        }
        for s in &plan.statuses {
            memory.statuses.insert(
                s.profile.clone(),
                WrittenStatus {
                    uid: s.uid.clone(),
                    resource_version: s.resource_version.clone(),
                    status: s.status.clone(),
                    written_at: s.written_at,
                },
            );
        }
    }

    #[test]
    fn a_deleting_profile_with_nodes_holding_originals_waits_and_wakes_before_the_timeout() {
        let mut p = web("web");
        p.metadata.deletion_timestamp = Some(Time(at(0)));
        let profiles = [p];
        let reports = [NodeTuningReport::test("n1")
            .listing(&["web"])
            .holding(&["net.ipv4.tcp_fin_timeout"])];
        let snap = snapshot(
            &profiles,
            &reports,
            nodes(&[("n1", &[("role", "web"), (AGENT_NODE_LABEL, "true")])]),
            at(100),
        );
        let plan = plan(&args(), &snap, &TermMemory::default()).expect("plan");
        assert!(plan.releases.is_empty(), "{:?}", plan.releases);
        assert!(plan.add_finalizers.is_empty());
        assert!(plan.statuses.is_empty(), "no status for a deleting profile");
        // 600 s timeout, 100 s gone: the next pass is due no later than just after it ends.
        assert!(plan.wake_in <= RESYNC, "{:?}", plan.wake_in);
        assert!(plan.labels.unlabel.is_empty());
        assert!(plan.labels.draining.contains("n1"));

        // Past the timeout: released, naming the holdout.
        let snap = snapshot(&profiles, &reports, snap.nodes, at(700));
        let plan = super::plan(&args(), &snap, &TermMemory::default()).expect("plan");
        assert_eq!(plan.releases.len(), 1);
        let r = &plan.releases[0];
        assert_eq!(
            r.cause,
            ReleaseCause::TimedOut {
                holdouts: vec!["n1".into()]
            }
        );
        assert!(r.note.contains("n1"), "{}", r.note);
        assert!(r.patch.finalizers.is_empty());
        assert_eq!(r.patch.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn the_wake_up_comes_before_a_near_timeout() {
        let mut p = web("web");
        p.metadata.deletion_timestamp = Some(Time(at(0)));
        let profiles = [p];
        let reports = [NodeTuningReport::test("n1").listing(&["web"])];
        let snap = snapshot(&profiles, &reports, nodes(&[("n1", &[])]), at(590));
        let plan = plan(&args(), &snap, &TermMemory::default()).expect("plan");
        assert!(plan.releases.is_empty());
        assert_eq!(plan.wake_in, Duration::from_secs(11));
    }

    #[test]
    fn a_restored_deleting_profile_is_released() {
        let mut p = web("web");
        p.metadata.deletion_timestamp = Some(Time(at(0)));
        p.metadata.finalizers = Some(vec!["other/keep".into(), finalizer::FINALIZER.into()]);
        let profiles = [p];
        let reports = [NodeTuningReport::test("n1").listing(&[])];
        let snap = snapshot(&profiles, &reports, nodes(&[("n1", &[])]), at(5));
        let plan = plan(&args(), &snap, &TermMemory::default()).expect("plan");
        assert_eq!(plan.releases.len(), 1);
        assert_eq!(plan.releases[0].cause, ReleaseCause::AllRestored);
        assert_eq!(plan.releases[0].patch.finalizers, vec!["other/keep"]);
    }

    #[test]
    fn a_timestamp_only_change_gives_no_status_patch() {
        let profiles = [web("web")];
        let mut r1 = NodeTuningReport::test("n1").listing(&["web"]);
        if let Some(s) = r1.status.as_mut() {
            s.last_report_time = Some(Time(at(1)));
        }
        let reports = [r1.clone()];
        let n = nodes(&[("n1", &[("role", "web"), (AGENT_NODE_LABEL, "true")])]);
        let mut memory = TermMemory::default();
        let first = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(2)),
            &memory,
        )
        .expect("plan");
        assert_eq!(first.statuses.len(), 1);
        assert!(first.daemonset.is_some());
        assert_eq!(first.statuses[0].events.len(), 1, "Applied");
        remember(&mut memory, &first, Some(1));

        // Only the report's time moved, and the DaemonSet is as applied.
        if let Some(s) = r1.status.as_mut() {
            s.last_report_time = Some(Time(at(60)));
        }
        let reports = [r1];
        let mut snap = snapshot(&profiles, &reports, n, at(61));
        snap.daemonset = LiveDaemonSet::Present {
            generation: Some(1),
        };
        let second = plan(&args(), &snap, &memory).expect("plan");
        assert!(second.statuses.is_empty(), "{:?}", second.statuses);
        assert_eq!(second.statuses_unchanged, 1);
        assert!(second.daemonset.is_none());

        // Someone edited the DaemonSet (generation moved): apply again.
        snap.daemonset = LiveDaemonSet::Present {
            generation: Some(2),
        };
        assert!(
            plan(&args(), &snap, &memory)
                .expect("plan")
                .daemonset
                .is_some()
        );
    }

    #[test]
    fn a_node_that_stops_matching_keeps_its_label_until_its_report_shows_nothing_held() {
        let profiles = [web("web")];
        let n = nodes(&[("n1", &[("role", "db"), (AGENT_NODE_LABEL, "true")])]);
        let held = [NodeTuningReport::test("n1")
            .listing(&["web"])
            .holding(&["net.ipv4.tcp_fin_timeout"])];
        let plan1 = plan(
            &args(),
            &snapshot(&profiles, &held, n.clone(), at(1)),
            &TermMemory::default(),
        )
        .expect("plan");
        assert!(plan1.labels.unlabel.is_empty());
        assert!(plan1.labels.draining.contains("n1"));
        let clean = [NodeTuningReport::test("n1").listing(&[])];
        let plan2 = plan(
            &args(),
            &snapshot(&profiles, &clean, n, at(2)),
            &TermMemory::default(),
        )
        .expect("plan");
        assert!(plan2.labels.unlabel.contains("n1"));
    }

    #[test]
    fn one_bad_object_does_not_stop_the_others() {
        let bad = web("bad").with_bad_selector();
        let mut fresh = web("fresh");
        fresh.metadata.finalizers = None;
        let profiles = [bad, fresh, web("good")];
        let reports = [NodeTuningReport::test("n1").listing(&["good", "fresh"])];
        let n = nodes(&[("n1", &[("role", "web")])]);
        let plan = plan(
            &args(),
            &snapshot(&profiles, &reports, n, at(1)),
            &TermMemory::default(),
        )
        .expect("plan");
        assert_eq!(plan.labels.selector_errors.len(), 1);
        assert!(
            plan.labels.label.contains("n1"),
            "the good profiles still label"
        );
        assert_eq!(plan.add_finalizers.len(), 1);
        assert_eq!(plan.add_finalizers[0].profile, "fresh");
        assert_eq!(
            plan.add_finalizers[0].resource_version.as_deref(),
            Some("7")
        );
        let statuses: std::collections::BTreeMap<&str, &NodeTuningProfileStatus> = plan
            .statuses
            .iter()
            .map(|s| (s.profile.as_str(), &s.status))
            .collect();
        assert_eq!(statuses.len(), 3);
        let stalled = crate::conditions::find(
            &statuses["bad"].conditions,
            crate::conditions::Type::Stalled,
        )
        .expect("stalled");
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "InvalidSelector")
        );
        assert!(crate::conditions::is_true(
            &statuses["good"].conditions,
            crate::conditions::Type::Ready
        ));
    }

    #[test]
    fn memory_of_a_written_status_wins_over_a_lagging_cache() {
        let profiles = [web("web")];
        let reports = [NodeTuningReport::test("n1").listing(&["web"])];
        let n = nodes(&[("n1", &[("role", "web")])]);
        let mut memory = TermMemory::default();
        let first = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(1)),
            &memory,
        )
        .expect("plan");
        remember(&mut memory, &first, None);
        // The cache still shows the profile without status (same resourceVersion): no rewrite.
        let again = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(2)),
            &memory,
        )
        .expect("plan");
        assert!(again.statuses.is_empty());
        // A new resourceVersion (someone else wrote): compare with what the object says.
        let mut moved = web("web");
        moved.metadata.resource_version = Some("8".into());
        let profiles = [moved];
        let third = plan(&args(), &snapshot(&profiles, &reports, n, at(3)), &memory).expect("plan");
        assert_eq!(third.statuses.len(), 1);
    }

    #[test]
    fn tcp_only_changes_wait_for_the_telemetry_interval_and_standing_changes_do_not() {
        let profiles = [web("web")];
        let n = nodes(&[("n1", &[("role", "web")])]);
        let busy = |time_wait: i64, listed: &[&str]| {
            let mut r = NodeTuningReport::test("n1").listing(listed);
            if let Some(s) = r.status.as_mut() {
                s.tcp.total.insert("TIME_WAIT".into(), time_wait);
            }
            r
        };
        let mut memory = TermMemory::default();
        let reports = [busy(1, &["web"])];
        let first = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(0)),
            &memory,
        )
        .expect("plan");
        assert_eq!(first.statuses.len(), 1);
        remember(&mut memory, &first, None);

        // Only TIME_WAIT moved, 5 s after the write: deferred, and the pass wakes when due.
        let reports = [busy(500, &["web"])];
        let soon = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(5)),
            &memory,
        )
        .expect("plan");
        assert!(soon.statuses.is_empty());
        assert_eq!(soon.statuses_unchanged, 1);
        assert_eq!(soon.wake_in, Duration::from_secs(25));

        // Past the interval it is written, with the new totals.
        let due = plan(
            &args(),
            &snapshot(&profiles, &reports, n.clone(), at(30)),
            &memory,
        )
        .expect("plan");
        assert_eq!(due.statuses.len(), 1);
        assert_eq!(due.statuses[0].status.tcp_states["TIME_WAIT"], 500);

        // The node no longer applying the profile, 5 s after the write: written at once.
        let reports = [busy(500, &[])];
        let failing =
            plan(&args(), &snapshot(&profiles, &reports, n, at(5)), &memory).expect("plan");
        assert_eq!(failing.statuses.len(), 1);
        assert_eq!(failing.statuses[0].status.applied_nodes, 0);
    }
}
