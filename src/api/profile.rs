//! `NodeTuningProfile`: which nodes get which sysctls.
// clippy reads each `printcolumn(type_ = ...)` as a repeat of one attribute.
#![allow(clippy::duplicated_attributes)]
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

/// Lowest and highest accepted `spec.priority`.
pub const PRIORITY_MIN: i32 = -1000;
pub const PRIORITY_MAX: i32 = 1000;
/// Bounds of `spec.sysctls`.
pub const MAX_SYSCTLS: usize = 256;
pub const MAX_VALUE_LEN: usize = 4096;
/// How many per-node summaries a profile's status keeps (unhealthy first), so the object stays
/// small on clusters of thousands of nodes.
pub const MAX_NODE_SUMMARIES: usize = 20;

/// Desired kernel parameters for the nodes a label selector picks.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodetune.dev",
    version = "v1alpha1",
    kind = "NodeTuningProfile",
    shortname = "ntp",
    category = "nodetune",
    status = "NodeTuningProfileStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Sysctls to apply on the nodes a label selector picks, merged by priority where profiles overlap.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Matched",
        type_ = "integer",
        json_path = ".status.matchedNodes"
    ),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.appliedNodes"
    ),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failedNodes"),
    printcolumn(
        name = "Time_Wait",
        type_ = "integer",
        json_path = r#".status.tcpStates[?(@.state=="TIME_WAIT")].total"#
    ),
    printcolumn(
        name = "Established",
        type_ = "integer",
        json_path = r#".status.tcpStates[?(@.state=="ESTABLISHED")].total"#
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeTuningProfileSpec {
    /// Nodes this profile applies to; absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Pods whose network namespaces this profile tunes, on the nodes `nodeSelector` picks.
    /// Setting it (or `namespaceSelector`) makes the profile target pods: its keys are applied
    /// inside each selected pod's own network namespace (pods with `hostNetwork` excluded) and
    /// never to the host's, so only `NetworkNamespace`-scoped keys are allowed. `{}` selects
    /// every pod of the selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Namespaces (by their labels) whose pods this profile tunes; absent (with `podSelector`
    /// set) means every namespace. Setting it makes the profile target pods, as `podSelector`
    /// does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Tolerations added to the agent pods so they can run on tainted nodes this profile selects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Sysctl key (dotted or slash form, as sysctl(8) takes it) to value, e.g.
    /// `net.ipv4.ip_local_port_range: "32768 65000"`. A leading `-` (as in sysctl.d(5)) marks a key
    /// that may be missing on a node's kernel: reported Unsupported there, not a failure.
    #[schemars(schema_with = "schema::sysctls")]
    pub sysctls: BTreeMap<String, String>,

    /// Higher wins when several profiles set the same key on a node; ties go to the profile name
    /// that sorts first. -1000 to 1000, default 0.
    #[serde(default)]
    #[schemars(range(min = PRIORITY_MIN, max = PRIORITY_MAX))]
    pub priority: i32,

    /// `Enforce` (default) writes the values; `DryRun` only reports what would change.
    #[serde(default)]
    pub mode: Mode,

    /// Put each node's original value back when this profile stops applying to it (default
    /// true).
    #[serde(default = "default_true")]
    #[schemars(default = "default_true")]
    pub restore_on_removal: bool,

    /// Roll changes of `sysctls` and `mode` out in waves, each node soaking under guards on its
    /// kernel's TCP counters, instead of to every node at once. Absent: every change reaches
    /// every selected node at once (and no revision history is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::rollout::RolloutSpec>,

    /// Also write this profile's keys to the node's own sysctl.d file
    /// (`/etc/sysctl.d/99-zz-nodetune.conf`), so they hold from early boot, before the agent
    /// runs (default false). Needs the cluster policy to allow it (`allowPersist`) and the
    /// agents' host mount to be writable there; pod-targeting profiles are never persisted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persist: bool,
}

impl NodeTuningProfileSpec {
    /// Whether this profile tunes pods' network namespaces rather than the host's: either pod
    /// selector set, even to `{}`.
    pub fn targets_pods(&self) -> bool {
        self.pod_selector.is_some() || self.namespace_selector.is_some()
    }
}

fn default_true() -> bool {
    true
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// Roll-up of the per-node reports for one profile, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTuningProfileStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `Conflicted`.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// Nodes the selector matches.
    #[serde(default)]
    pub matched_nodes: i32,
    /// Nodes whose agent applied (or, in DryRun, evaluated) the current generation without failure.
    #[serde(default)]
    pub applied_nodes: i32,
    /// Nodes where at least one key of this profile failed.
    #[serde(default)]
    pub failed_nodes: i32,
    /// Matched nodes with no report for the current generation yet.
    #[serde(default)]
    pub pending_nodes: i32,
    /// Matched nodes where another writer keeps changing one of this profile's keys back
    /// (their reports' `contested`); the agents there back off instead of fighting.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub contested_nodes: i32,
    /// TCP sockets per state (netstat names), summed over the matched nodes, in kernel state order.
    #[serde(default, with = "super::state_list::totals")]
    #[schemars(schema_with = "super::state_list::totals::schema")]
    pub tcp_states: BTreeMap<String, i64>,
    /// TCP sockets per state in the matched nodes' pod network namespaces (their reports'
    /// `pods.states`), summed; absent when no node counts pods.
    #[serde(
        default,
        with = "super::state_list::totals",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    #[schemars(schema_with = "super::state_list::totals::schema")]
    pub pod_tcp_states: BTreeMap<String, i64>,
    /// At most a few per-node summaries, unhealthy first.
    #[serde(default)]
    #[schemars(length(max = MAX_NODE_SUMMARIES))]
    pub nodes: Vec<NodeSummary>,
    /// The newest report time among the matched nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
    /// For profiles that target pods: each key across the selected pods of the matched nodes
    /// (their reports' `podSysctls`), summed. A node where some pod failed a key counts as
    /// failed (`failedNodes`, `Degraded`), and its summary in `nodes` names the first such pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SYSCTLS))]
    pub pod_sysctls: Vec<PodKeyTotal>,
    /// Revisions and the rollout in progress; only for profiles with `spec.rollout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::rollout::RolloutStatus>,
}

/// One key of a pod-targeting profile, summed over the matched nodes' selected pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodKeyTotal {
    /// The sysctl key, canonical dotted form.
    pub key: String,
    /// Selected pods that should hold the key.
    pub pods: i64,
    /// Pods holding the value (in DryRun: evaluated).
    pub applied: i64,
    /// Pods whose own `securityContext.sysctls` sets another value (the pod's value stays).
    #[serde(default)]
    pub conflicts: i64,
    /// Pods where the key was not applied.
    #[serde(default)]
    pub failed: i64,
}

/// One node's standing for a profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    /// Node name.
    pub name: String,
    /// `Applied`, `DryRun`, `Failed`, `Pending` or `Overridden`.
    pub state: String,
    /// The profile generation the node's agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
    /// What is wrong on this node, naming the keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
