//! Staged rollouts, decided: from a profile's `spec.rollout`, its recorded rollout status and a
//! digest of each selected node, which revision each node must run, the new status and the
//! Events. Pure (no API, no clock): the controller's pass feeds it and writes the result; a new
//! leader goes on from the status and the Node annotations alone.
//!
//! Rules, in order of precedence:
//! - a new revision (an edit of `sysctls` or `mode`) supersedes the rollout in flight: nodes on
//!   the superseded revision go back to the stable one at once (it never proved itself), and the
//!   new revision starts from the first wave (the canary);
//! - a node without an assignment (new, or newly selected) runs the stable revision until a
//!   wave takes it;
//! - a wave starts only when the previous one has soaked; the canary, when set, is wave 1, alone;
//! - a node soaks from the moment its report shows the revision applied; a failing key, an
//!   un-Ready report, a Node not Ready or a tripped guard fails it: `Rollback` sends every node on the revision
//!   back to the stable one (phase `RolledBack`, until the next edit or an undo), `Pause` stops
//!   the waves (phase `Paused`, until resumed);
//! - when every selected node is on the revision and soaked, it becomes the stable one.
pub mod guards;
pub mod node_ready;
pub mod revisions;
pub mod wiring;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::Mode;
use crate::api::rollout::{
    GuardFailure, MAX_SOAKING_LISTED, OnFailure, RolloutPhase, RolloutSpec, RolloutStatus,
    SoakingNode,
};
use crate::controller::rollup::EventReason;

/// What the planner needs of one selected node (borrowing from the pass's caches).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeDigest<'a> {
    pub name: String,
    /// The revision the Node annotation assigns it for this profile.
    pub assigned: Option<i64>,
    /// The revision its report says it applied for this profile.
    pub applied: Option<i64>,
    /// Its report is Ready with no failed key of this profile.
    pub healthy: bool,
    /// It matches the canary selector.
    pub canary: bool,
    pub health: guards::Health<'a>,
    /// Why the Node itself is not Ready (read for soaking nodes only); `None`: Ready or unknown.
    pub not_ready: Option<&'a str>,
}

/// One profile's rollout inputs.
pub struct Input<'a> {
    pub spec: &'a RolloutSpec,
    pub sysctls: &'a BTreeMap<String, String>,
    pub mode: Mode,
    pub previous: Option<&'a RolloutStatus>,
    /// The selected nodes, by name.
    pub nodes: &'a [NodeDigest<'a>],
    /// A resume after a guard paused the rollout: the revision it acknowledges.
    pub resume: Option<i64>,
    pub now: Timestamp,
}

/// An Event to publish on the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutEvent {
    pub warning: bool,
    pub reason: EventReason,
    pub message: String,
}

/// The decision for one profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub status: RolloutStatus,
    /// Node to revision; `None` removes the node's entry (it then runs the stable revision).
    pub assignments: BTreeMap<String, Option<i64>>,
    pub events: Vec<RolloutEvent>,
    /// When the next pass is needed (a soak ends), if any.
    pub wake_in: Option<Duration>,
}

impl Output {
    /// The revision `node` is assigned once this output is written.
    fn effective(&self, node: &NodeDigest<'_>) -> Option<i64> {
        match self.assignments.get(&node.name) {
            Some(a) => *a,
            None => node.assigned,
        }
    }
}

/// Decides one pass of one profile's rollout.
pub fn plan(input: &Input<'_>) -> Output {
    let (status, new_revision) = revisions::record(input.previous, input.sysctls, input.mode);
    let mut out = Output {
        status,
        assignments: BTreeMap::new(),
        events: Vec::new(),
        wake_in: None,
    };
    if new_revision && out.status.phase == RolloutPhase::Progressing {
        out.events.push(RolloutEvent {
            warning: false,
            reason: EventReason::RevisionCreated,
            message: format!(
                "revision {} rolls out in waves; nodes run revision {} until their wave",
                out.status.current_revision,
                out.status.stable_revision.unwrap_or_default()
            ),
        });
    }
    send_superseded_back(&mut out, input.nodes);
    match out.status.phase {
        RolloutPhase::Complete => {}
        RolloutPhase::RolledBack => roll_back(&mut out, input.nodes),
        RolloutPhase::Progressing | RolloutPhase::Paused => step(&mut out, input),
    }
    count(&mut out, input.nodes);
    out
}

/// Nodes assigned neither the current nor the stable revision (a superseded one) go back to
/// the stable revision.
fn send_superseded_back(out: &mut Output, nodes: &[NodeDigest<'_>]) {
    let (current, stable) = (out.status.current_revision, out.status.stable_revision);
    for n in nodes {
        if n.assigned
            .is_some_and(|a| a != current && Some(a) != stable)
        {
            out.assignments.insert(n.name.clone(), None);
        }
    }
}

/// Every node on the current revision back to the stable one.
fn roll_back(out: &mut Output, nodes: &[NodeDigest<'_>]) {
    let current = out.status.current_revision;
    for n in nodes {
        if out.effective(n) == Some(current) {
            out.assignments.insert(n.name.clone(), None);
        }
    }
    out.status.soaking.clear();
}

/// One step of a rollout in progress or paused: soaks, guards, then the next wave.
fn step(out: &mut Output, input: &Input<'_>) {
    let soak = input
        .spec
        .soak
        .as_deref()
        .map(crate::duration::parse)
        .transpose()
        .unwrap_or_default()
        .unwrap_or_default();
    if out.status.failure.is_some() && input.resume == Some(out.status.current_revision) {
        // Resumed after a guard paused it: the failed node soaks again from the start.
        out.status.failure = None;
        for s in &mut out.status.soaking {
            s.since = None;
        }
    }
    if out.status.failure.is_none() {
        watch_soaks(out, input, soak);
    }
    if out.status.phase == RolloutPhase::RolledBack {
        return;
    }
    let paused = input.spec.paused || out.status.failure.is_some();
    out.status.phase = if paused {
        RolloutPhase::Paused
    } else {
        RolloutPhase::Progressing
    };
    if paused || !out.status.soaking.is_empty() {
        return;
    }
    next_wave(out, input);
}

/// Starts the soak of nodes that applied the revision, fails those that broke a guard, and
/// lets go of those that soaked long enough.
fn watch_soaks(out: &mut Output, input: &Input<'_>, soak: Duration) {
    let current = out.status.current_revision;
    let control = control_rates(out, input.nodes);
    let now = input.now;
    let mut trip = None;
    let mut still = Vec::new();
    for mut s in std::mem::take(&mut out.status.soaking) {
        let Some(node) = input.nodes.iter().find(|n| n.name == s.name) else {
            continue; // no longer selected: nothing to watch
        };
        if node.applied != Some(current) {
            // The Node annotation may not have been written (a failed patch): write it again.
            if out.effective(node) != Some(current) {
                out.assignments.insert(node.name.clone(), Some(current));
            }
            still.push(s);
            continue;
        }
        let since = s.since.get_or_insert(Time(now)).0;
        let failed = judge_node(node, input, &s, &control);
        if let Some(t) = failed {
            trip.get_or_insert((node.name.clone(), t));
            still.push(s);
            continue;
        }
        let soaked = Duration::try_from(now.duration_since(since)).unwrap_or_default();
        // Soaked long enough: done, off the list.
        if let Some(left) = soak.checked_sub(soaked).filter(|left| !left.is_zero()) {
            out.wake_in = Some(out.wake_in.map_or(left, |w| w.min(left)));
            still.push(s);
        }
    }
    out.status.soaking = still;
    if let Some((node, t)) = trip {
        fail(out, input, node, t);
    }
}

/// What fails a soaking node that applied the revision: its report not Ready or a key failed,
/// the Node itself not Ready, or a guard.
fn judge_node(
    node: &NodeDigest<'_>,
    input: &Input<'_>,
    s: &SoakingNode,
    control: &BTreeMap<&str, i64>,
) -> Option<guards::Trip> {
    if !node.healthy {
        return Some(guards::Trip {
            guard: "report Ready".into(),
            before: None,
            during: 0,
            limit: 0,
            message: "the node's report is not Ready or a key of this revision failed".into(),
        });
    }
    if let Some(why) = node.not_ready {
        return Some(guards::Trip {
            guard: "Node Ready".into(),
            before: None,
            during: 0,
            limit: 0,
            message: why.to_string(),
        });
    }
    guards::judge(&input.spec.guards, &node.health, &s.before, control)
}

/// The highest rate per counter among the selected nodes not on the current revision
/// (borrowing the counters' names from the nodes' digests).
fn control_rates<'n>(out: &Output, nodes: &'n [NodeDigest<'_>]) -> BTreeMap<&'n str, i64> {
    let current = out.status.current_revision;
    let mut control: BTreeMap<&str, i64> = BTreeMap::new();
    for n in nodes.iter().filter(|n| out.effective(n) != Some(current)) {
        for (k, v) in n.health.rates.iter() {
            let e = control.entry(&**k).or_insert(*v);
            *e = (*e).max(*v);
        }
    }
    control
}

/// A guard tripped on `node`: record it, and roll back or pause.
fn fail(out: &mut Output, input: &Input<'_>, node: String, t: guards::Trip) {
    let revision = out.status.current_revision;
    let summary = format!(
        "guard {} tripped on node {node} with revision {revision}: {}",
        t.guard, t.message
    );
    out.status.failure = Some(GuardFailure {
        node,
        guard: t.guard,
        revision,
        before: t.before,
        during: t.during,
        limit: t.limit,
        message: t.message,
        at: Some(Time(input.now)),
    });
    match input.spec.on_failure {
        OnFailure::Rollback => {
            out.status.phase = RolloutPhase::RolledBack;
            roll_back(out, input.nodes);
            out.events.push(RolloutEvent {
                warning: true,
                reason: EventReason::RolloutRolledBack,
                message: format!(
                    "{summary}; every node on it goes back to revision {}",
                    out.status.stable_revision.unwrap_or_default()
                ),
            });
        }
        OnFailure::Pause => {
            out.status.phase = RolloutPhase::Paused;
            out.events.push(RolloutEvent {
                warning: true,
                reason: EventReason::RolloutPaused,
                message: format!("{summary}; paused until resumed"),
            });
        }
    }
}

/// Completes the rollout when every node is on it, else assigns the next wave.
fn next_wave(out: &mut Output, input: &Input<'_>) {
    let current = out.status.current_revision;
    let remaining: Vec<&NodeDigest<'_>> = input
        .nodes
        .iter()
        .filter(|n| out.effective(n) != Some(current))
        .collect();
    if remaining.is_empty() {
        revisions::mark_rolled_out(&mut out.status, current);
        out.events.push(RolloutEvent {
            warning: false,
            reason: EventReason::RolloutComplete,
            message: format!(
                "revision {current} runs on all {} selected node(s)",
                input.nodes.len()
            ),
        });
        return;
    }
    let wave = pick_wave(out.status.wave, input, &remaining);
    out.status.wave += 1;
    let guarded: Vec<&str> = input
        .spec
        .guards
        .iter()
        .filter_map(|g| g.counter.as_deref())
        .collect();
    for n in &wave {
        out.assignments.insert(n.name.clone(), Some(current));
        out.status.soaking.push(SoakingNode {
            name: n.name.clone(),
            since: None,
            before: n
                .health
                .rates
                .iter()
                .filter(|(k, _)| guarded.contains(&&**k))
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        });
    }
    let names: Vec<&str> = wave.iter().map(|n| n.name.as_str()).collect();
    out.events.push(RolloutEvent {
        warning: false,
        reason: EventReason::RolloutWave,
        message: format!(
            "wave {}: revision {current} to {}",
            out.status.wave,
            name_list(&names)
        ),
    });
}

/// The nodes of the next wave: the canary first (when set, as wave 1), then up to
/// `maxNodesInFlight` nodes by name. At most [`MAX_SOAKING_LISTED`]: the status lists them all.
fn pick_wave<'n, 'a>(
    waves_so_far: i32,
    input: &Input<'_>,
    remaining: &[&'n NodeDigest<'a>],
) -> Vec<&'n NodeDigest<'a>> {
    if waves_so_far == 0
        && let Some(canary) = &input.spec.canary
    {
        let picked: Vec<&NodeDigest<'_>> = match canary.nodes {
            Some(n) => remaining
                .iter()
                .copied()
                .take(usize::try_from(n).unwrap_or(1))
                .collect(),
            None => remaining.iter().copied().filter(|n| n.canary).collect(),
        };
        if !picked.is_empty() {
            return picked.into_iter().take(MAX_SOAKING_LISTED).collect();
        }
    }
    let limit = max_in_flight(input.spec.max_nodes_in_flight.as_ref(), input.nodes.len());
    remaining.iter().copied().take(limit).collect()
}

/// The first ten names, and how many more.
fn name_list(names: &[&str]) -> String {
    let shown = names
        .iter()
        .take(10)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    match names.len().saturating_sub(10) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// `maxNodesInFlight` as a node count for `nodes` selected nodes: a percentage rounds down,
/// at least 1; at most [`MAX_SOAKING_LISTED`].
pub fn max_in_flight(spec: Option<&IntOrString>, nodes: usize) -> usize {
    let n = match spec {
        None => 1,
        Some(IntOrString::Int(n)) => usize::try_from(*n).unwrap_or(1),
        Some(IntOrString::String(s)) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<usize>().ok())
            .map_or(1, |p| nodes.saturating_mul(p.min(100)) / 100),
    };
    n.clamp(1, MAX_SOAKING_LISTED)
}

/// The node counts of the status, and its one-line message.
fn count(out: &mut Output, nodes: &[NodeDigest<'_>]) {
    let current = out.status.current_revision;
    let int = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let updated = nodes
        .iter()
        .filter(|n| out.effective(n) == Some(current))
        .count();
    let soaking = out.status.soaking.len();
    let s = &mut out.status;
    s.nodes = int(nodes.len());
    s.nodes_updated = int(updated);
    s.nodes_soaking = int(soaking);
    s.nodes_healthy = int(updated.saturating_sub(soaking));
    s.nodes_failed = i32::from(s.failure.is_some());
    if s.phase == RolloutPhase::Complete {
        s.nodes_updated = s.nodes;
        s.nodes_healthy = s.nodes;
    }
    s.message = Some(match s.phase {
        RolloutPhase::Complete => format!("revision {current} on all {} node(s)", s.nodes),
        RolloutPhase::Progressing => format!(
            "revision {current}: wave {}, {} of {} node(s) updated, {soaking} soaking",
            s.wave, s.nodes_updated, s.nodes
        ),
        RolloutPhase::Paused => match &s.failure {
            Some(f) => format!("paused: guard {} tripped on node {}", f.guard, f.node),
            None => format!(
                "paused at wave {}: {} of {} node(s) updated",
                s.wave, s.nodes_updated, s.nodes
            ),
        },
        RolloutPhase::RolledBack => match &s.failure {
            Some(f) => format!(
                "rolled back to revision {}: guard {} tripped on node {}",
                s.stable_revision.unwrap_or_default(),
                f.guard,
                f.node
            ),
            None => "rolled back".into(),
        },
    });
}

#[cfg(test)]
mod tests;
