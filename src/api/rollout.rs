//! Staged rollouts of a profile's changes: `spec.rollout` (how), `status.rollout` (revisions and
//! where the rollout stands). The planner is `controller::rollout`; the agent picks its node's
//! revision in `agent::revision`.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::profile::Mode;

/// Revisions a profile's status keeps (oldest dropped first), as a DaemonSet keeps 10
/// ControllerRevisions by default.
pub const MAX_REVISIONS: usize = 10;
/// Most bytes (as JSON) the revision history may take in the status: a profile's sysctls may
/// be many and long, and the status is one etcd object with the rest of the profile. Past it
/// the oldest revisions go, never the current nor the stable one.
pub const MAX_REVISIONS_BYTES: usize = 64 * 1024;
/// Most guards a rollout takes.
pub const MAX_GUARDS: usize = 8;
/// Most nodes the status lists as soaking; the rest are counted only.
pub const MAX_SOAKING_LISTED: usize = 50;
/// The Node annotation holding the revision the controller assigned to the node, per profile:
/// JSON `{"profile": revision number}`.
pub const REVISIONS_ANNOTATION: &str = "nodetune.dev/revisions";

/// How a profile's changes reach its nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.soak) || self.soak.matches('^[0-9]{1,7}(ms|s|m|h)$')",
        "message": "spec.rollout.soak must be a duration such as 10s, 5m or 1h",
        "fieldPath": ".soak"
    },
    {
        "rule": "!has(self.maxNodesInFlight) || (type(self.maxNodesInFlight) == int ? self.maxNodesInFlight >= 1 : self.maxNodesInFlight.matches('^([1-9][0-9]?|100)%$'))",
        "message": "spec.rollout.maxNodesInFlight must be a count of at least 1 or a percentage from 1% to 100%",
        "fieldPath": ".maxNodesInFlight"
    }
]))]
pub struct RolloutSpec {
    /// Nodes that may be taking or soaking the new revision at once: a count (`2`) or a share
    /// of the selected nodes (`25%`, rounded down, at least one). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes_in_flight: Option<IntOrString>,
    /// Nodes that take the new revision first, alone, before any wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// How long a node must stay healthy on the new revision before it counts as done
    /// (`10s`, `5m`, `1h`). Default 0: healthy once its report shows the revision applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<String>,
    /// The health each node must keep during its soak, besides its report being Ready with no
    /// failed key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_GUARDS))]
    pub guards: Vec<Guard>,
    /// What a failed guard does: `Rollback` (default: the failed node and every node already
    /// on the new revision go back to the previous one) or `Pause`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// No new node takes the revision while true (nodes soaking go on soaking).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// The canary: a number of nodes, or the nodes a label selector picks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.nodes) != has(self.selector)",
        "message": "spec.rollout.canary takes either nodes (a count) or selector, exactly one"
    }
]))]
pub struct Canary {
    /// How many nodes go first (the first by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub nodes: Option<i32>,
    /// The selected nodes that also match this go first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// One guard: a kernel TCP counter's rate during the soak against a limit, or the TIME_WAIT
/// headroom. Rates are per minute, from the node's report (`status.tcpCounters`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.counter) ? ((has(self.maxPerMinute) ? 1 : 0) + (has(self.maxPercentOfBefore) ? 1 : 0) + (has(self.maxPercentOfControl) ? 1 : 0) == 1 && !has(self.minTimeWaitHeadroomPercent)) : (has(self.minTimeWaitHeadroomPercent) && !has(self.maxPerMinute) && !has(self.maxPercentOfBefore) && !has(self.maxPercentOfControl))",
        "message": "a guard takes a counter with exactly one of maxPerMinute, maxPercentOfBefore, maxPercentOfControl; or minTimeWaitHeadroomPercent alone"
    },
    {
        "rule": "!has(self.counter) || self.counter in ['ListenOverflows', 'ListenDrops', 'TCPTimeWaitOverflow', 'TCPAbortOnMemory', 'TCPAbortOnTimeout', 'TCPMemoryPressures', 'TCPBacklogDrop', 'TCPReqQFullDrop', 'TCPOFODrop', 'TCPSynRetrans', 'RetransSegs', 'OutSegs', 'AttemptFails', 'EstabResets', 'OutRsts', 'InErrs']",
        "message": "guard counter must be one the agent reports: ListenOverflows, ListenDrops, TCPTimeWaitOverflow, TCPAbortOnMemory, TCPAbortOnTimeout, TCPMemoryPressures, TCPBacklogDrop, TCPReqQFullDrop, TCPOFODrop, TCPSynRetrans, RetransSegs, OutSegs, AttemptFails, EstabResets, OutRsts or InErrs",
        "fieldPath": ".counter"
    }
]))]
pub struct Guard {
    /// A counter of the node's report (`status.tcpCounters`), e.g. `ListenOverflows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// Trips when the counter rises faster than this per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_per_minute: Option<i64>,
    /// Trips when the rate exceeds this percentage of the node's own rate before the change
    /// (200: twice as fast). A rate before of 0 counts as 1 per minute, so noise on a quiet
    /// node trips nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100))]
    pub max_percent_of_before: Option<i64>,
    /// Trips when the rate exceeds this percentage of the highest rate among the selected nodes
    /// not yet updated (a control group: load that rises fleet-wide trips nothing; 0 counts as
    /// 1). Not judged once no selected node is left to compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100))]
    pub max_percent_of_control: Option<i64>,
    /// Trips when TIME_WAIT sockets leave less than this percentage of
    /// `net.ipv4.tcp_max_tw_buckets` free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub min_time_wait_headroom_percent: Option<i32>,
}

impl Guard {
    /// How the guard reads in status and Events, e.g. `ListenOverflows maxPerMinute 10`.
    pub fn describe(&self) -> String {
        let counter = self.counter.as_deref().unwrap_or_default();
        match (
            self.max_per_minute,
            self.max_percent_of_before,
            self.max_percent_of_control,
            self.min_time_wait_headroom_percent,
        ) {
            (Some(n), _, _, _) => format!("{counter} maxPerMinute {n}"),
            (_, Some(p), _, _) => format!("{counter} maxPercentOfBefore {p}"),
            (_, _, Some(p), _) => format!("{counter} maxPercentOfControl {p}"),
            (_, _, _, Some(p)) => format!("minTimeWaitHeadroomPercent {p}"),
            _ => format!("{counter} (no limit)"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnFailure {
    #[default]
    Rollback,
    Pause,
}

/// One revision: the values (and mode) of one version of `spec.sysctls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// 1, 2, ... in order of the edits.
    pub number: i64,
    /// A hash of `sysctls` and `mode`: an edit that changes neither is no new revision.
    pub hash: String,
    /// The sysctls of this revision.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// The mode of this revision.
    #[serde(default)]
    pub mode: Mode,
    /// It once finished rolling out (every selected node soaked on it): `rollout undo` after
    /// a complete rollout goes back to the newest such revision, never to one rolled back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_out: bool,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPhase {
    /// Every selected node runs the current revision.
    #[default]
    Complete,
    /// Waves are going out.
    Progressing,
    /// `spec.rollout.paused`, or a guard tripped with `onFailure: Pause`.
    Paused,
    /// A guard tripped and the updated nodes were sent back to the stable revision.
    RolledBack,
}

/// A node on the new revision, soaking.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SoakingNode {
    /// The node.
    pub name: String,
    /// When its report first showed the revision applied; absent while it is taking it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The guarded counters' per-minute rates on the node when it was assigned the revision.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub before: BTreeMap<String, i64>,
}

/// Which guard tripped where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardFailure {
    /// The node where the guard tripped.
    pub node: String,
    /// The guard as written, e.g. `ListenOverflows maxPerMinute 10`.
    pub guard: String,
    /// The revision that failed.
    pub revision: i64,
    /// The value before the change (a per-minute rate; for the TIME_WAIT guard, the headroom
    /// percentage), when known.
    #[serde(default)]
    pub before: Option<i64>,
    /// The value during the soak that tripped the guard.
    pub during: i64,
    /// The limit it crossed.
    pub limit: i64,
    /// What happened, with the figures.
    pub message: String,
    /// When the controller saw it.
    pub at: Option<Time>,
}

/// Revisions and the rollout in progress. No field is left out when empty: the controller
/// writes status with a merge patch, where a missing field would keep the old value (a soak
/// list or a failure that is over).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The newest revisions, oldest first, at most 10.
    #[serde(default)]
    #[schemars(length(max = MAX_REVISIONS))]
    pub revisions: Vec<Revision>,
    /// The revision being rolled out (the newest).
    #[serde(default)]
    pub current_revision: i64,
    /// The last revision that finished rolling out: what nodes not yet in a wave (and nodes
    /// that join) run, and what a rollback returns to. Absent before the first finished.
    #[serde(default)]
    pub stable_revision: Option<i64>,
    #[serde(default)]
    pub phase: RolloutPhase,
    /// Waves started for the current revision (the canary is wave 1 when there is one).
    #[serde(default)]
    pub wave: i32,
    /// Selected nodes.
    #[serde(default)]
    pub nodes: i32,
    /// Nodes assigned the current revision (soaking or done).
    #[serde(default)]
    pub nodes_updated: i32,
    /// Nodes taking or soaking the current revision.
    #[serde(default)]
    pub nodes_soaking: i32,
    /// Nodes done with the current revision.
    #[serde(default)]
    pub nodes_healthy: i32,
    /// Nodes where a guard tripped.
    #[serde(default)]
    pub nodes_failed: i32,
    /// The nodes soaking, at most 50.
    #[serde(default)]
    #[schemars(length(max = MAX_SOAKING_LISTED))]
    pub soaking: Vec<SoakingNode>,
    /// The guard that stopped the rollout, on which node.
    #[serde(default)]
    pub failure: Option<GuardFailure>,
    /// One line on where the rollout stands.
    #[serde(default)]
    pub message: Option<String>,
}

impl RolloutStatus {
    /// The revision numbered `n`, if still in the history.
    pub fn revision(&self, n: i64) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.number == n)
    }
}

/// A stable hash of a revision's content (FNV-1a over its JSON), in hex. Not `DefaultHasher`:
/// its output may change between Rust releases, and the hash is stored.
pub fn content_hash(sysctls: &BTreeMap<String, String>, mode: Mode) -> String {
    let text = serde_json::to_string(&(sysctls, mode)).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Reads the [`REVISIONS_ANNOTATION`] value; anything unreadable is no assignment (the node
/// then runs the stable revision), never an error that stops the agent.
pub fn parse_assignments(value: Option<&str>) -> BTreeMap<String, i64> {
    value
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_values_and_mode_only() {
        let a = BTreeMap::from([("net.core.somaxconn".to_string(), "4096".to_string())]);
        let mut b = a.clone();
        assert_eq!(
            content_hash(&a, Mode::Enforce),
            content_hash(&b, Mode::Enforce)
        );
        assert_ne!(
            content_hash(&a, Mode::Enforce),
            content_hash(&a, Mode::DryRun)
        );
        b.insert("net.core.somaxconn".into(), "128".into());
        assert_ne!(
            content_hash(&a, Mode::Enforce),
            content_hash(&b, Mode::Enforce)
        );
        // Stored, so fixed: a known value.
        assert_eq!(content_hash(&BTreeMap::new(), Mode::Enforce).len(), 16);
    }

    #[test]
    fn admission_knows_the_counters_the_agent_reports() {
        let schema = serde_json::to_string(&schemars::schema_for!(Guard)).expect("schema");
        for (_, name) in crate::tcpstat::counters::COUNTERS {
            assert!(
                schema.contains(&format!("'{name}'")),
                "{name} missing from the guard's CEL rule"
            );
        }
        let listed = schema.matches("', '").count() + 1;
        assert_eq!(
            listed,
            crate::tcpstat::counters::COUNTERS.len(),
            "no extra names"
        );
    }

    #[test]
    fn an_empty_rollout_status_clears_what_a_merge_patch_would_keep() {
        let json = serde_json::to_value(RolloutStatus::default()).expect("json");
        assert_eq!(json["soaking"], serde_json::json!([]));
        assert_eq!(json["failure"], serde_json::Value::Null);
        assert!(json.as_object().is_some_and(|o| o.contains_key("failure")));
        assert!(
            json.as_object()
                .is_some_and(|o| o.contains_key("stableRevision"))
        );
        let failure = serde_json::to_value(GuardFailure::default()).expect("json");
        assert!(
            failure
                .as_object()
                .is_some_and(|o| o.contains_key("before"))
        );
    }

    #[test]
    fn assignments_parse_leniently() {
        assert_eq!(
            parse_assignments(Some(r#"{"web":3}"#)),
            BTreeMap::from([("web".to_string(), 3)])
        );
        assert!(parse_assignments(Some("{not json")).is_empty());
        assert!(parse_assignments(Some(r#"{"web":"3"}"#)).is_empty());
        assert!(parse_assignments(None).is_empty());
    }
}
