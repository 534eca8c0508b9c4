//! Per-profile roll-up of the node reports into `NodeTuningProfileStatus`. Pure.
//!
//! The status stays small whatever the cluster size: counts, one TCP state map, at most
//! [`MAX_NODE_SUMMARIES`] node summaries (unhealthy first) and five conditions whose messages are
//! bounded. Whether a new roll-up is worth writing is [`crate::status_write`]'s call.
//! [`standing`] reads one node's report, [`transitions`] turns status changes into Events.
pub mod join;
pub(crate) mod standing;
mod transitions;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::profile::MAX_NODE_SUMMARIES;
use crate::api::{KeyState, Mode, NodeSummary, NodeTuningProfile, NodeTuningProfileStatus};
use crate::conditions::{Builder, MAX_MESSAGE, Reason, Type};
use crate::controller::cache::{Counts, ReportDigest};
use crate::tcpstat::TcpState;
use crate::text::{bounded_list, counted, nodes_word};
#[cfg(test)]
use crate::{controller::cache::Reports, plan::Selected};
pub use join::{Joined, Rows};
use standing::{NodeStanding, overrides, standing, summary};
pub use transitions::{EventReason, Transition, transitions};

/// The status of `profile` given the nodes it selects ([`crate::plan::selection`]) and every
/// node's report, looked up by name. `previous` is the status last seen or written (for
/// lastTransitionTime); `now` stamps new transitions. The controller's pass joins nodes to
/// reports once and tallies every profile in one walk ([`rollup_all`]); this is the same
/// roll-up for one profile by name, the reference the unit tests hold the pass's against.
#[cfg(test)]
pub(crate) fn rollup(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    selected: &Selected<'_>,
    reports: &Reports,
    now: Timestamp,
) -> NodeTuningProfileStatus {
    let nodes = selected.as_ref().map(|nodes| {
        nodes
            .iter()
            .map(|node| (*node, reports.get(*node).map(|r| &**r)))
    });
    rollup_nodes(profile, previous, nodes, now)
}

/// The roll-up over the rows `profile` selects in the pass's [`Joined`] nodes: no look-up.
#[cfg(test)]
pub(crate) fn rollup_joined(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    rows: &Rows,
    joined: &Joined<'_>,
    now: Timestamp,
) -> NodeTuningProfileStatus {
    let nodes = rows
        .as_ref()
        .map(|rows| rows.iter().map(|row| joined.row(*row)));
    rollup_nodes(profile, previous, nodes, now)
}

/// One profile of [`rollup_all`]: the profile, the status last seen or written, its rows.
#[derive(Clone, Copy)]
pub struct RollupInput<'a> {
    pub profile: &'a NodeTuningProfile,
    pub previous: Option<&'a NodeTuningProfileStatus>,
    pub rows: &'a Rows,
}

/// The roll-ups of several profiles, the same as one roll-up per profile, in one walk
/// over the joined nodes: each node's digest is read for all the profiles that select it at
/// once, while it is in the cache. One profile after the other, a cluster's digests (about
/// 1 KiB a node) were read from memory again by every profile once they outgrew the core's
/// cache, and the cost per node grew with the cluster.
pub fn rollup_all(
    inputs: &[RollupInput<'_>],
    joined: &Joined<'_>,
    now: Timestamp,
) -> Vec<NodeTuningProfileStatus> {
    let rows: Vec<&[u32]> = inputs
        .iter()
        .map(|i| i.rows.as_deref().unwrap_or_default())
        .collect();
    let keys: Vec<(&str, i64)> = inputs
        .iter()
        .map(|i| {
            let m = &i.profile.metadata;
            (
                m.name.as_deref().unwrap_or_default(),
                m.generation.unwrap_or_default(),
            )
        })
        .collect();
    let mut tallies: Vec<Tally<'_, '_>> = inputs.iter().map(|_| Tally::new()).collect();
    // Each profile's next selected row: rows ascend, so one cursor per profile suffices.
    let mut next = vec![0usize; inputs.len()];
    for row in 0..u32::try_from(joined.len()).unwrap_or(u32::MAX) {
        let mut node = None;
        for (k, tally) in tallies.iter_mut().enumerate() {
            if rows[k].get(next[k]) == Some(&row) {
                next[k] += 1;
                let (n, report) = *node.get_or_insert_with(|| joined.row(row));
                tally.add(keys[k].0, keys[k].1, n, report);
            }
        }
    }
    inputs
        .iter()
        .zip(tallies)
        .map(|(i, tally)| {
            let (matched, error) = match i.rows {
                Ok(rows) => (rows.len(), None),
                Err(e) => (0, Some(e.to_string())),
            };
            finish(i.profile, i.previous, matched, error, tally, now)
        })
        .collect()
}

/// The roll-up over the matched nodes, each with its report (if any), in node order.
#[cfg(test)]
fn rollup_nodes<'n, 'r>(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    nodes: Result<
        impl ExactSizeIterator<Item = (&'n str, Option<&'r ReportDigest>)>,
        &crate::selector::SelectorError,
    >,
    now: Timestamp,
) -> NodeTuningProfileStatus {
    let name = profile.metadata.name.as_deref().unwrap_or_default();
    let generation = profile.metadata.generation.unwrap_or_default();
    let mut tally = Tally::new();
    let (matched, selector_error) = match nodes {
        Ok(nodes) => {
            let matched = nodes.len();
            for (node, report) in nodes {
                tally.add(name, generation, node, report);
            }
            (matched, None)
        }
        Err(e) => (0, Some(e.to_string())),
    };
    finish(profile, previous, matched, selector_error, tally, now)
}

/// The status from a profile's tally: counts, conditions, node summaries.
fn finish(
    profile: &NodeTuningProfile,
    previous: Option<&NodeTuningProfileStatus>,
    matched: usize,
    selector_error: Option<String>,
    mut tally: Tally<'_, '_>,
    now: Timestamp,
) -> NodeTuningProfileStatus {
    let generation = profile.metadata.generation.unwrap_or_default();
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let b = Builder::new(previous_conditions, Some(generation), now);
    let facts = Facts {
        profile,
        generation,
        matched,
        selector_error,
        tally: &tally,
    };
    let conditions = vec![
        ready_condition(&b, &facts),
        reconciling_condition(&b, &facts),
        stalled_condition(&b, &facts),
        degraded_condition(&b, &facts),
        conflicted_condition(&b, &tally.conflicts),
        time_wait_condition(&b, &tally.pressed),
    ];
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let pod_sysctls = tally.pod_key_totals();
    NodeTuningProfileStatus {
        pod_sysctls,
        observed_generation: Some(generation),
        conditions,
        matched_nodes: count(facts.matched),
        applied_nodes: count(tally.applied),
        failed_nodes: count(tally.failed),
        pending_nodes: count(tally.pending),
        contested_nodes: count(tally.contested),
        last_report_time: tally.last_report.map(Time),
        nodes: tally.summaries(),
        tcp_states: tally.tcp.into_map(true),
        pod_tcp_states: tally.pod_tcp.into_map(false),
        // The rollout's part is the rollout planner's (controller::rollout): carried over here.
        rollout: previous.and_then(|p| p.rollout.clone()),
    }
}

/// What the matched nodes' reports add up to, gathered in one walk over the nodes.
struct Tally<'n, 'r> {
    /// The nodes' host TCP totals, summed.
    tcp: Sums,
    /// The nodes' pods' per-state counts (reports' `status.pods.states`), summed.
    pod_tcp: Sums,
    last_report: Option<Timestamp>,
    applied: usize,
    failed: usize,
    pending: usize,
    /// Nodes where a key of this profile is contested.
    contested: usize,
    /// Pod-targeting profiles: key -> pods, applied, conflicts, failed, summed over nodes.
    pod_keys: BTreeMap<Arc<str>, [i64; 4]>,
    /// (key, state) -> how many nodes fail it that way. Keys are interned: no copy per node.
    failures: BTreeMap<(Arc<str>, KeyState), usize>,
    /// (key, winning profile) -> how many nodes override it (borrowed from the digests).
    conflicts: BTreeMap<(&'r str, &'r str), usize>,
    /// The node summaries the status shows: unhealthy first, then by name, bounded.
    shown: LowestKeys<(u8, &'n str), (NodeStanding, Option<i64>)>,
    /// Nodes whose report says TIME_WAIT is at its cap: named (bounded) in a warning condition.
    pressed: Vec<&'n str>,
}

impl<'n, 'r> Tally<'n, 'r> {
    fn new() -> Self {
        Self {
            tcp: Sums::default(),
            pod_tcp: Sums::default(),
            last_report: None,
            applied: 0,
            failed: 0,
            pending: 0,
            contested: 0,
            pod_keys: BTreeMap::new(),
            failures: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            shown: LowestKeys::new(MAX_NODE_SUMMARIES),
            pressed: Vec::new(),
        }
    }

    /// Adds one matched node and its report (if any) for profile `name` at `generation`.
    fn add(
        &mut self,
        name: &str,
        generation: i64,
        node: &'n str,
        report: Option<&'r ReportDigest>,
    ) {
        if let Some(r) = report {
            self.add_telemetry(node, r);
            if r.contested.iter().any(|p| &**p == name) {
                self.contested += 1;
            }
            for k in r.profile(name).into_iter().flat_map(|p| p.pod_keys.iter()) {
                let sum = self.pod_keys.entry(k.key.clone()).or_default();
                for (s, n) in sum.iter_mut().zip(k.counts) {
                    *s = s.saturating_add(n);
                }
            }
        }
        for (key, winner) in overrides(name, report) {
            *self.conflicts.entry((&**key, winner)).or_default() += 1;
        }
        let (st, seen_generation) = standing(name, generation, report);
        match &st {
            NodeStanding::Failed(keys) => {
                self.failed += 1;
                for k in keys {
                    *self.failures.entry((k.key.clone(), k.state)).or_default() += 1;
                }
            }
            NodeStanding::Pending(_) => self.pending += 1,
            NodeStanding::Applied { .. } => self.applied += 1,
        }
        self.shown.offer((st.rank(), node), (st, seen_generation));
    }

    /// The node's TCP totals (its pods' too), TIME_WAIT pressure and report time.
    fn add_telemetry(&mut self, node: &'n str, r: &ReportDigest) {
        self.tcp.add(&r.tcp);
        self.pod_tcp.add(&r.pod_tcp);
        if r.time_wait_pressure {
            self.pressed.push(node);
        }
        if let Some(t) = r.last_report {
            self.last_report = Some(self.last_report.map_or(t, |l| l.max(t)));
        }
    }

    /// The pod-targeting keys' sums, by key.
    fn pod_key_totals(&self) -> Vec<crate::api::PodKeyTotal> {
        self.pod_keys
            .iter()
            .map(
                |(key, [pods, applied, conflicts, failed])| crate::api::PodKeyTotal {
                    key: key.to_string(),
                    pods: *pods,
                    applied: *applied,
                    conflicts: *conflicts,
                    failed: *failed,
                },
            )
            .collect()
    }

    /// The kept node summaries, unhealthy first, then by name.
    fn summaries(&mut self) -> Vec<NodeSummary> {
        std::mem::replace(&mut self.shown, LowestKeys::new(0))
            .into_sorted()
            .into_iter()
            .map(|((_, node), (st, seen))| summary(node, st, seen))
            .collect()
    }

    /// The failing keys with their node counts, as one bounded message.
    fn failure_list(&self) -> String {
        let parts = counted(self.failures.clone(), |(key, state)| {
            format!("{key}: {state:?}")
        });
        bounded_list(&parts, MAX_MESSAGE)
    }
}

/// Per-state sums over nodes (saturating): the known states in a fixed array, so adding a
/// node is eleven additions and no map look-up.
#[derive(Default)]
struct Sums {
    known: [i64; TcpState::ALL.len()],
    /// Bit i: some node listed `TcpState::ALL[i]`.
    listed: u16,
    other: BTreeMap<String, i64>,
}

impl Sums {
    fn add(&mut self, c: &Counts) {
        for (sum, n) in self.known.iter_mut().zip(c.known) {
            *sum = sum.saturating_add(n);
        }
        self.listed |= c.listed;
        for (state, n) in &c.other {
            let sum = self.other.entry(state.to_string()).or_insert(0);
            *sum = sum.saturating_add(*n);
        }
    }

    /// The sums by state name: every known state when `all` (the host totals always show
    /// them), else only those some node listed.
    fn into_map(self, all: bool) -> BTreeMap<String, i64> {
        let mut map = self.other;
        for (i, state) in TcpState::ALL.iter().enumerate() {
            if all || self.listed & (1 << i) != 0 {
                map.insert(state.as_str().to_string(), self.known[i]);
            }
        }
        map
    }
}

/// What the conditions are decided from.
struct Facts<'a, 'n, 'r> {
    profile: &'a NodeTuningProfile,
    generation: i64,
    matched: usize,
    /// The profile's selector cannot be evaluated: why.
    selector_error: Option<String>,
    tally: &'a Tally<'n, 'r>,
}

fn ready_condition(b: &Builder<'_>, f: &Facts<'_, '_, '_>) -> Condition {
    let dry_run = f.profile.spec.mode == Mode::DryRun;
    let verb = if dry_run { "evaluated" } else { "applied" };
    let (applied, failed, pending) = (f.tally.applied, f.tally.failed, f.tally.pending);
    match (&f.selector_error, f.matched) {
        (Some(e), _) => b.make(Type::Ready, false, Reason::InvalidSelector, e.clone()),
        // Nothing to do is done (kstatus Ready, so `kubectl wait` and Argo CD do not hang on a
        // profile for an empty node pool), but said loudly: a selector typo looks like this.
        // `transitions` publishes a Warning Event when a profile enters this state.
        (None, 0) => b.make(
            Type::Ready,
            true,
            Reason::NoMatchingNodes,
            no_match_message(f.profile),
        ),
        (None, m) if applied == m => b.make(
            Type::Ready,
            true,
            if dry_run {
                Reason::Evaluated
            } else {
                Reason::Applied
            },
            format!("{verb} on all {}", nodes_word(m)),
        ),
        (None, m) if failed > 0 => b.make(
            Type::Ready,
            false,
            Reason::NodesFailed,
            format!(
                "{verb} on {applied} of {}; failed on {failed}",
                nodes_word(m)
            ),
        ),
        (None, m) => b.make(
            Type::Ready,
            false,
            Reason::NodesPending,
            format!(
                "{verb} on {applied} of {}; waiting for {pending}",
                nodes_word(m)
            ),
        ),
    }
}

fn reconciling_condition(b: &Builder<'_>, f: &Facts<'_, '_, '_>) -> Condition {
    let pending = f.tally.pending;
    if pending > 0 {
        b.make(
            Type::Reconciling,
            true,
            Reason::NodesPending,
            format!(
                "{} not yet reported generation {}",
                nodes_word(pending),
                f.generation
            ),
        )
    } else {
        b.make(
            Type::Reconciling,
            false,
            Reason::AllNodesReported,
            String::new(),
        )
    }
}

/// Stalled: it cannot finish without a change (kstatus): a key refused somewhere, or a
/// selector that cannot be evaluated.
fn stalled_condition(b: &Builder<'_>, f: &Facts<'_, '_, '_>) -> Condition {
    match (&f.selector_error, f.tally.failed) {
        (Some(e), _) => b.make(Type::Stalled, true, Reason::InvalidSelector, e.clone()),
        (None, 0) => b.make(Type::Stalled, false, Reason::NoFailures, String::new()),
        (None, failed) => b.make(
            Type::Stalled,
            true,
            Reason::KeysFailed,
            format!(
                "{} cannot apply every key: {}",
                nodes_word(failed),
                f.tally.failure_list()
            ),
        ),
    }
}

fn degraded_condition(b: &Builder<'_>, f: &Facts<'_, '_, '_>) -> Condition {
    if f.tally.failed > 0 {
        b.make(
            Type::Degraded,
            true,
            Reason::KeysFailed,
            f.tally.failure_list(),
        )
    } else {
        b.make(Type::Degraded, false, Reason::NoFailures, String::new())
    }
}

fn conflicted_condition(b: &Builder<'_>, conflicts: &BTreeMap<(&str, &str), usize>) -> Condition {
    if conflicts.is_empty() {
        return b.make(Type::Conflicted, false, Reason::NoConflicts, String::new());
    }
    let parts = counted(conflicts.clone(), |(key, winner)| {
        format!("{key}: overridden by {winner}")
    });
    b.make(
        Type::Conflicted,
        true,
        Reason::KeysOverridden,
        bounded_list(&parts, MAX_MESSAGE),
    )
}

/// `TimeWaitPressure` on the profile: the matched nodes whose reports say TIME_WAIT is at or
/// near `tcp_max_tw_buckets`. A warning beside Ready, never a failure: the profile's keys are
/// applied; it is the node's load that needs a look (or a higher cap). Node names only, so the
/// status does not change with every count.
fn time_wait_condition(b: &Builder<'_>, pressed: &[&str]) -> Condition {
    if pressed.is_empty() {
        return b.make(
            Type::TimeWaitPressure,
            false,
            Reason::TimeWaitHeadroom,
            String::new(),
        );
    }
    let names: Vec<String> = pressed.iter().map(|n| n.to_string()).collect();
    b.make(
        Type::TimeWaitPressure,
        true,
        Reason::TimeWaitPressure,
        format!(
            "TIME_WAIT at or near net.ipv4.tcp_max_tw_buckets on {}: {} (see each node's NodeTuningReport)",
            nodes_word(pressed.len()),
            bounded_list(&names, MAX_MESSAGE / 2)
        ),
    )
}

/// What to say when the selector matches no node: the selector as `kubectl get nodes -l`
/// takes it, so the user can check it against the nodes' labels.
fn no_match_message(profile: &NodeTuningProfile) -> String {
    match profile.spec.node_selector.as_ref().map(selector_text) {
        Some(sel) if !sel.is_empty() => format!(
            "no node matches the selector {sel:?}; nothing is applied (check it with: kubectl get nodes -l '{sel}')"
        ),
        _ => "the cluster has no node; nothing is applied".into(),
    }
}

/// A label selector in `kubectl -l` syntax.
fn selector_text(s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> String {
    let labels = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"));
    let exprs = s.match_expressions.iter().flatten().map(|e| {
        let values = e.values.as_deref().unwrap_or_default().join(",");
        match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => format!("{} {other} ({values})", e.key),
        }
    });
    labels.chain(exprs).collect::<Vec<_>>().join(",")
}

/// The `cap` entries with the lowest keys among those offered, in bounded memory: a roll-up over
/// 20,000 nodes keeps 20, not 20,000. Nodes arrive in name order (from the node cache), so once
/// full almost every offer is refused by one comparison with the largest kept key.
struct LowestKeys<K, V> {
    cap: usize,
    kept: Vec<(K, V)>,
    /// Index of the largest kept key, once `kept` is full.
    max: usize,
}

impl<K: Ord, V> LowestKeys<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            kept: Vec::with_capacity(cap),
            max: 0,
        }
    }

    fn offer(&mut self, key: K, value: V) {
        if self.kept.len() < self.cap {
            self.kept.push((key, value));
            if self.kept.len() == self.cap {
                self.max = self.index_of_max();
            }
        } else if self.cap > 0 && key < self.kept[self.max].0 {
            self.kept[self.max] = (key, value);
            self.max = self.index_of_max();
        }
    }

    fn index_of_max(&self) -> usize {
        (0..self.kept.len())
            .max_by(|a, b| self.kept[*a].0.cmp(&self.kept[*b].0))
            .unwrap_or(0)
    }

    fn into_sorted(mut self) -> Vec<(K, V)> {
        self.kept.sort_by(|a, b| a.0.cmp(&b.0));
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AppliedProfile, NodeTuningReport, SysctlEntry};
    use crate::controller::labels::NodeLabels;
    use crate::status_write::{StatusChange, classify};
    use crate::test_fixtures::entry;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn profile(name: &str, generation: i64) -> NodeTuningProfile {
        NodeTuningProfile::test(name)
            .selecting(&["role=web"])
            .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
            .with_generation(generation)
    }

    /// The roll-up of `p` with the selection computed as the controller does.
    fn rollup(
        p: &NodeTuningProfile,
        previous: Option<&NodeTuningProfileStatus>,
        nodes: &NodeLabels<'_>,
        reports: &Reports,
        now: Timestamp,
    ) -> NodeTuningProfileStatus {
        let selection = crate::plan::selection([p], nodes);
        let selected = selection.values().next().expect("one profile");
        super::rollup(p, previous, selected, reports, now)
    }

    fn web_nodes(n: usize) -> NodeLabels<'static> {
        crate::plan::owned_node_labels((0..n).map(|i| {
            (
                format!("node-{i:05}"),
                [("role".to_string(), "web".to_string())].into(),
            )
        }))
    }

    fn report(
        node: &str,
        profiles: &[(&str, i64, &[&str])],
        sysctls: Vec<SysctlEntry>,
        tw: i64,
    ) -> NodeTuningReport {
        let mut r = NodeTuningReport::test(node);
        let status = r.status_mut();
        status.profiles = profiles
            .iter()
            .map(|(name, generation, over)| AppliedProfile {
                name: name.to_string(),
                generation: *generation,
                mode: Mode::Enforce,
                overridden_keys: over.iter().map(|s| s.to_string()).collect(),
                revision: None,
            })
            .collect();
        status.sysctls = sysctls;
        status.last_report_time = Some(Time(
            Timestamp::from_second(1_700_000_000 + tw).expect("ts"),
        ));
        status.tcp.total = [
            ("TIME_WAIT".to_string(), tw),
            ("ESTABLISHED".to_string(), 1),
        ]
        .into();
        r
    }

    /// One report a node of `nodes`, each with `web` applied and nothing else to say.
    fn web_applied(nodes: &NodeLabels<'_>) -> Vec<NodeTuningReport> {
        nodes
            .keys()
            .map(|n| report(n, &[("web", 1, &[])], vec![], 1))
            .collect()
    }

    fn index(reports: &[NodeTuningReport]) -> Reports {
        crate::controller::cache::reports_of(reports)
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
        let s = rollup(&p, None, &NodeLabels::new(), &Reports::new(), now());
        assert_eq!(s.matched_nodes, 0);
        let ready = get(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "NoMatchingNodes")
        );
        assert_eq!(get(&s, "Reconciling").status, "False");
        assert_eq!(s.tcp_states.len(), TcpState::ALL.len());
        assert!(s.tcp_states.values().all(|v| *v == 0));
        assert_eq!(s.observed_generation, Some(1));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );
        assert!(
            ready.message.contains("\"role=web\"")
                && ready.message.contains("kubectl get nodes -l 'role=web'"),
            "{}",
            ready.message
        );
        // Issue 17 item 16: a selector that matches nothing is said with a Warning Event, once,
        // and no Applied event.
        let t = transitions(None, &s);
        assert_eq!(
            t.iter().map(|t| t.reason).collect::<Vec<_>>(),
            [EventReason::NoMatchingNodes]
        );
        assert!(t[0].reason.is_warning());
        assert!(t[0].note.contains("role=web"), "{}", t[0].note);
        assert!(transitions(Some(&s), &s).is_empty(), "said once");
    }

    /// Issue 18: a pod-targeting profile's keys are summed over the nodes' pods, and a node
    /// where a pod failed a key counts as failed, its summary naming the first such pod.
    #[test]
    fn pod_key_results_are_summed_and_a_pod_failure_fails_its_node() {
        use crate::api::{PodKeyOutcome, PodSysctlEntry};
        let p = profile("web", 1);
        let nodes = web_nodes(2);
        let entry = |applied: i32, failed: i32| PodSysctlEntry {
            key: "net.ipv4.tcp_fin_timeout".into(),
            profile: "web".into(),
            desired: "30".into(),
            pods: applied + failed + 1,
            applied,
            conflicts: 1,
            failed,
            named: (failed > 0)
                .then(|| PodKeyOutcome {
                    namespace: "proxy".into(),
                    name: "squid-0".into(),
                    state: KeyState::Failed,
                    message: "write refused: Permission denied".into(),
                })
                .into_iter()
                .collect(),
        };
        let mut reports = vec![
            report("node-00000", &[("web", 1, &[])], vec![], 0),
            report("node-00001", &[("web", 1, &[])], vec![], 0),
        ];
        for (r, (applied, failed)) in reports.iter_mut().zip([(3, 0), (1, 2)]) {
            if let Some(status) = r.status.as_mut() {
                status.pod_sysctls = vec![entry(applied, failed)];
            }
        }
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!(
            s.pod_sysctls,
            [crate::api::PodKeyTotal {
                key: "net.ipv4.tcp_fin_timeout".into(),
                pods: 8,
                applied: 4,
                conflicts: 2,
                failed: 2,
            }]
        );
        assert_eq!((s.applied_nodes, s.failed_nodes), (1, 1));
        assert_eq!(get(&s, "Degraded").status, "True");
        let failed = &s.nodes[0];
        assert_eq!(
            (failed.name.as_str(), failed.state.as_str()),
            ("node-00001", "Failed")
        );
        let message = failed.message.as_deref().unwrap_or_default();
        assert!(
            message.contains("2 of 4 pods") && message.contains("proxy/squid-0"),
            "{message}"
        );
    }

    #[test]
    fn pods_totals_sum_beside_host_totals_and_only_when_counted() {
        let p = profile("web", 1);
        let nodes = web_nodes(3);
        let mut reports = vec![
            report("node-00000", &[("web", 1, &[])], vec![], 10),
            report("node-00001", &[("web", 1, &[])], vec![], 20),
            report("node-00002", &[("web", 1, &[])], vec![], 30),
        ];
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert!(s.pod_tcp_states.is_empty(), "no node counts pods");
        let json = serde_json::to_value(&s).expect("json");
        assert!(json.get("podTcpStates").is_none(), "{json}");

        for (r, tw) in reports.iter_mut().take(2).zip([1_478, 22]) {
            if let Some(status) = r.status.as_mut() {
                status.pods = Some(crate::api::PodsTcp {
                    states: [("TIME_WAIT".into(), tw), ("CLOSE_WAIT".into(), 15)].into(),
                    ..Default::default()
                });
            }
        }
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!(s.pod_tcp_states["TIME_WAIT"], 1_500);
        assert_eq!(s.pod_tcp_states["CLOSE_WAIT"], 30);
        assert_eq!(s.tcp_states["TIME_WAIT"], 60, "host totals unchanged");
        // Pod counts moving are telemetry, like the host's: no standing change.
        let mut busier = s.clone();
        busier.pod_tcp_states.insert("TIME_WAIT".into(), 9_000);
        assert_eq!(classify(Some(&s), &busier), StatusChange::Telemetry);
    }

    #[test]
    fn counts_and_conditions() {
        let p = profile("web", 2);
        let mut nodes = web_nodes(5);
        nodes.insert(
            "db".into(),
            std::borrow::Cow::Owned([("role".to_string(), "db".to_string())].into()),
        );
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
        let ready = get(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NodesFailed")
        );
        assert_eq!(get(&s, "Reconciling").status, "True");
        let stalled = get(&s, "Stalled");
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "KeysFailed")
        );
        assert!(
            stalled
                .message
                .contains("net.ipv4.tcp_tw_recycle: Unsupported on 1 node"),
            "{}",
            stalled.message
        );
        let degraded = get(&s, "Degraded");
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

    /// Issue 19: the profile status counts the nodes where one of its keys is contested, and
    /// a contested key is no failure (the node stays applied).
    #[test]
    fn contested_nodes_are_counted_for_the_profile_that_sets_the_key() {
        let p = profile("web", 1);
        let nodes = web_nodes(2);
        let mut reports = web_applied(&nodes);
        let contested = |profile: &str| crate::api::ContestedKey {
            key: "net.ipv4.tcp_fin_timeout".into(),
            profile: Some(profile.into()),
            foreign_value: "60".into(),
            corrections: 6,
            ..Default::default()
        };
        if let Some(s) = reports[0].status.as_mut() {
            s.contested = vec![contested("web")];
        }
        if let Some(s) = reports[1].status.as_mut() {
            s.contested = vec![contested("other")];
        }
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!((s.contested_nodes, s.applied_nodes), (1, 2));
    }

    #[test]
    fn all_applied_is_ready_and_emits_applied() {
        let p = profile("web", 1);
        let nodes = web_nodes(2);
        let reports = web_applied(&nodes);
        let s = rollup(&p, None, &nodes, &index(&reports), now());
        let ready = get(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Applied")
        );
        // kstatus: done means Ready and neither Reconciling nor Stalled.
        assert_eq!(get(&s, "Reconciling").status, "False");
        assert_eq!(get(&s, "Stalled").status, "False");
        let t = transitions(None, &s);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].reason, EventReason::Applied);
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
            get(&s, "Degraded").message,
            "net.ipv4.tcp_tw_recycle: Unsupported on 4 nodes; net.ipv4.tcp_syncookies: Invalid on 3 nodes"
        );
        let t = transitions(None, &s);
        assert_eq!(
            t.iter().map(|t| t.reason).collect::<Vec<_>>(),
            [EventReason::Degraded]
        );
        assert!(t[0].reason.is_warning());
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
        let c = get(&s, "Conflicted");
        assert_eq!(c.status, "True");
        assert_eq!(
            c.message,
            "net.ipv4.tcp_fin_timeout: overridden by fast on 3 nodes"
        );
        assert_eq!(s.applied_nodes, 3, "an overridden key is not a failure");
        assert!(s.nodes.iter().all(|n| n.state == "Overridden"));
    }

    /// Issue 17 item 13: a node at its TIME_WAIT cap left the profile Ready with nothing to
    /// say. Now a warning condition names the node and an Event is published; Ready stays.
    #[test]
    fn time_wait_pressure_is_a_warning_beside_ready() {
        let p = profile("web", 1);
        let nodes = web_nodes(2);
        let mut reports = web_applied(&nodes);
        let calm = rollup(&p, None, &nodes, &index(&reports), now());
        assert_eq!(get(&calm, "TimeWaitPressure").status, "False");
        if let Some(s) = reports[1].status.as_mut() {
            s.conditions.push(Builder::new(&[], None, now()).make(
                Type::TimeWaitPressure,
                true,
                Reason::TimeWaitPressure,
                "at the cap".into(),
            ));
        }
        let s = rollup(&p, Some(&calm), &nodes, &index(&reports), now());
        let tw = get(&s, "TimeWaitPressure");
        assert_eq!(
            (tw.status.as_str(), tw.reason.as_str()),
            ("True", "TimeWaitPressure")
        );
        assert!(
            tw.message.contains("on 1 node: node-00001"),
            "{}",
            tw.message
        );
        assert_eq!(get(&s, "Ready").status, "True", "a warning, not a failure");
        assert_eq!(get(&s, "Stalled").status, "False");
        let t = transitions(Some(&calm), &s);
        assert_eq!(
            t.iter().map(|t| t.reason).collect::<Vec<_>>(),
            [EventReason::TimeWaitPressure]
        );
        assert!(t[0].reason.is_warning());
        assert!(transitions(Some(&s), &s).is_empty(), "said once");
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
                .all(|n| n.message.as_deref().unwrap_or_default().len()
                    <= standing::MAX_NODE_MESSAGE)
        );
        assert!(s.conditions.iter().all(|c| c.message.len() <= MAX_MESSAGE));
        assert!(get(&s, "Degraded").message.contains("more"));
        let size = serde_json::to_string(&s).expect("json").len();
        assert!(size < 16 * 1024, "status is {size} bytes");
    }

    #[test]
    fn lowest_keeps_the_smallest_keys_in_any_arrival_order() {
        for order in [
            (0..50).collect::<Vec<u32>>(),
            (0..50).rev().collect(),
            (0..50).map(|i| (i * 37) % 50).collect(),
        ] {
            let mut l = LowestKeys::new(5);
            for k in &order {
                l.offer(*k, k.to_string());
            }
            let kept: Vec<u32> = l.into_sorted().into_iter().map(|(k, _)| k).collect();
            assert_eq!(kept, [0, 1, 2, 3, 4], "{order:?}");
        }
        let mut none = LowestKeys::new(0);
        none.offer(1, ());
        assert!(none.into_sorted().is_empty());
        let mut few = LowestKeys::new(5);
        few.offer(2, ());
        few.offer(1, ());
        assert_eq!(few.into_sorted(), [(1, ()), (2, ())]);
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
        assert!(classify(Some(&first), &second) == StatusChange::Unchanged);
        assert_eq!(
            get(&first, "Ready").last_transition_time,
            get(&second, "Ready").last_transition_time
        );
        // A real change: the node fails a key.
        let r3 = vec![report(
            "node-00000",
            &[("web", 1, &[])],
            vec![entry("k.x", "web", KeyState::Denied)],
            1,
        )];
        let third = rollup(&p, Some(&second), &nodes, &index(&r3), later);
        assert!(classify(Some(&second), &third) != StatusChange::Unchanged);
        assert_eq!(get(&third, "Ready").last_transition_time, Time(later));
        assert_eq!(
            get(&third, "Conflicted").last_transition_time,
            get(&second, "Conflicted").last_transition_time
        );
        assert!(classify(None, &third) != StatusChange::Unchanged);
        assert_eq!(classify(None, &third), StatusChange::State);
        assert_eq!(classify(Some(&third), &third), StatusChange::Unchanged);
        let mut busier = third.clone();
        busier.tcp_states.insert("TIME_WAIT".into(), 1_000);
        assert_eq!(classify(Some(&third), &busier), StatusChange::Telemetry);
        busier.applied_nodes += 1;
        assert_eq!(classify(Some(&third), &busier), StatusChange::State);
    }

    #[test]
    fn new_generation_is_pending_until_reported() {
        let p = profile("web", 3);
        let nodes = web_nodes(1);
        let r = vec![report("node-00000", &[("web", 2, &[])], vec![], 1)];
        let s = rollup(&p, None, &nodes, &index(&r), now());
        assert_eq!((s.applied_nodes, s.pending_nodes), (0, 1));
        assert_eq!(get(&s, "Ready").reason, "NodesPending");
    }
}
