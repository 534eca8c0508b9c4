//! `NodeTuningReport`: what one node's agent applied and saw. Name = node name.
// clippy reads each `printcolumn(type_ = ...)` as a repeat of one attribute.
#![allow(clippy::duplicated_attributes)]
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::profile::Mode;
use super::schema;
use super::state_list::FamilyMaps;
use crate::sysctl::{KeyState, Scope};

/// Written only by the agent of the node it is named after.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodetune.dev",
    version = "v1alpha1",
    kind = "NodeTuningReport",
    shortname = "ntr",
    category = "nodetune",
    status = "NodeTuningReportStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "What the nodetune agent of one node applied, and the node's TCP socket counts.",
    printcolumn(
        name = "Profiles",
        type_ = "string",
        json_path = ".status.summary.profiles"
    ),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.summary.applied"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.summary.failed"
    ),
    printcolumn(
        name = "Established",
        type_ = "integer",
        json_path = r#".status.tcp.states[?(@.state=="ESTABLISHED")].total"#
    ),
    printcolumn(
        name = "Time_Wait",
        type_ = "integer",
        json_path = r#".status.tcp.states[?(@.state=="TIME_WAIT")].total"#
    ),
    printcolumn(
        name = "Pod_Time_Wait",
        type_ = "integer",
        json_path = ".status.pods.timeWait"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeTuningReportSpec {
    /// The node this report describes (equal to metadata.name).
    pub node_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTuningReportStatus {
    /// The node's kernel release (uname -r).
    #[serde(default)]
    pub kernel_release: String,
    /// The profiles that match this node, with the generation the agent acted on.
    #[serde(default)]
    pub profiles: Vec<AppliedProfile>,
    /// One entry per key that some matching profile sets, or that was restored.
    #[serde(default)]
    pub sysctls: Vec<SysctlEntry>,
    /// Per key of a pod-targeting profile: how the pods on this node that the profile selects
    /// stand (how many hold the value, which failed and why, bounded). Empty on nodes without
    /// pod-targeting profiles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_POD_SYSCTLS))]
    pub pod_sysctls: Vec<PodSysctlEntry>,
    /// Keys whose original value the node's ledger still holds (changed by nodetune, not yet
    /// restored). The controller waits for this to empty before it withdraws the agent.
    #[serde(default)]
    pub held_originals: Vec<String>,
    /// Times the agent found a key changed behind its back and wrote it again.
    #[serde(default)]
    pub drift_corrections: i64,
    /// Advice about the effective values (e.g. a port range overlapping the NodePort range).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// TCP sockets per state in the node's network namespace.
    #[serde(default)]
    pub tcp: TcpCounts,
    /// TIME_WAIT headroom and port range from /proc/net/sockstat and sysctls.
    #[serde(default)]
    pub sockstat: SockstatSummary,
    /// Flat figures for the printer columns.
    #[serde(default)]
    pub summary: ReportSummary,
    /// The node's standing, as conditions with observedGeneration (see the README).
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// When the agent last wrote this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
    /// TCP sockets in the pods' own network namespaces on this node (hostNetwork pods are the
    /// node's: counted in `tcp`). Absent when pod counting is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsTcp>,
    /// The boot the node is in (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// When this agent found the node rebooted since its ledger was written: the originals it
    /// holds were re-read from this boot, and that pass counted no drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebooted_at: Option<Time>,
    /// Keys of the node's profiles that the host's boot-time sysctl configuration (sysctl.d)
    /// sets to another value, with the file and line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_config: Vec<crate::sysctl::hostconf::HostConfigDiff>,
    /// The kernel's cumulative TCP counters of the node's network namespace that show damage
    /// after a TCP change (TcpExt of /proc/net/netstat, Tcp of /proc/net/snmp), with their
    /// rates. Absent when they could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_counters: Option<TcpCounterReport>,
    /// Keys the agent wrote to the node's own sysctl.d file (profiles with `persist: true`),
    /// so the node has them from boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONTESTED))]
    pub persisted: Vec<String>,
    /// Keys someone else keeps writing: corrected more often than the agent's threshold within
    /// its window. Their re-application backs off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONTESTED))]
    pub contested: Vec<ContestedKey>,
    /// Why the agent removed the startup taint `nodetune.dev/untuned` from this node; absent
    /// while the taint stays, or when the node never had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_taint: Option<String>,
}

/// Most keys listed in `contested` and `persisted` (a profile has at most 256 keys).
pub const MAX_CONTESTED: usize = 256;

/// A key another writer keeps changing back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContestedKey {
    /// The sysctl key (dotted).
    pub key: String,
    /// The profile that sets the key on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The value the agent last found instead of its own.
    pub foreign_value: String,
    /// Corrections within the window.
    pub corrections: i64,
    /// Where the foreign value plausibly comes from, when the host's boot-time configuration
    /// sets it (`/etc/sysctl.d/10-net.conf:3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Until when the agent leaves the key alone before correcting it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_until: Option<Time>,
}

/// Most counters a report lists: the agent's fixed list (`tcpstat::counters::COUNTERS`).
pub const MAX_TCP_COUNTERS: usize = 16;

/// The node's TCP damage counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpCounterReport {
    /// Seconds the per-minute rates were measured over (the last completed window); absent
    /// until the agent has watched one window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<i64>,
    /// One entry per counter this kernel has, in a fixed order.
    #[serde(default)]
    #[schemars(length(max = MAX_TCP_COUNTERS))]
    pub counters: Vec<TcpCounterValue>,
}

/// One kernel TCP counter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpCounterValue {
    /// The kernel's name, e.g. `ListenOverflows` (TcpExt) or `RetransSegs` (Tcp).
    pub name: String,
    /// The cumulative value since the network namespace was created.
    pub total: i64,
    /// Rises per minute over `intervalSeconds` (rounded down); absent before a window closed
    /// or when the counter went down (a new namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<i64>,
}

impl TcpCounterReport {
    /// The counter named `name`, if the report has it.
    pub fn get(&self, name: &str) -> Option<&TcpCounterValue> {
        self.counters.iter().find(|c| c.name == name)
    }
}

/// Most pods listed in a report's `status.pods.top`.
pub const MAX_TOP_PODS: usize = 10;

/// TCP sockets in the node's pod network namespaces.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodsTcp {
    /// Pod network namespaces counted this pass.
    #[serde(default)]
    pub namespaces: i32,
    /// TIME_WAIT sockets over all pods (their /proc/net/sockstat `tw`, fresh every pass; it
    /// includes orphaned FIN_WAIT2 sockets, which the kernel keeps in the same form).
    #[serde(default)]
    pub time_wait: i64,
    /// TCP sockets in use over all pods (sockstat `inuse`, both families, fresh every pass).
    #[serde(default)]
    pub in_use: i64,
    /// Sockets per state over all pods, from the last full walk (once per heartbeat).
    #[serde(default, with = "super::state_list::totals")]
    #[schemars(schema_with = "super::state_list::totals::schema")]
    pub states: BTreeMap<String, i64>,
    /// The pods with the most TIME_WAIT (ties by total sockets), at most 10.
    #[serde(default)]
    #[schemars(length(max = MAX_TOP_PODS))]
    pub top: Vec<PodTcp>,
    /// Pods in the node's own namespace (hostNetwork): their sockets are in `tcp`.
    #[serde(default)]
    pub host_network_pods: i32,
    /// Pod namespaces that could not be counted this pass (pod gone, PID reused, ...).
    #[serde(default)]
    pub skipped: i32,
    /// The pass reached its time or namespace bound: some pods are missing from the figures.
    #[serde(default)]
    pub truncated: bool,
    /// Why some namespaces were skipped, bounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One pod's TCP sockets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTcp {
    /// The pod's namespace; empty when the pod is not (yet) known to the agent's watch.
    #[serde(default)]
    pub namespace: String,
    /// The pod's name; empty when the pod is not (yet) known to the agent's watch.
    #[serde(default)]
    pub name: String,
    /// The pod's UID, from its cgroup.
    pub uid: String,
    /// TIME_WAIT sockets (sockstat `tw`, fresh every pass).
    #[serde(default)]
    pub time_wait: i64,
    /// Sockets over all states at the last walk.
    #[serde(default)]
    pub total: i64,
    /// Sockets per state at the last walk.
    #[serde(default, with = "super::state_list::totals")]
    #[schemars(schema_with = "super::state_list::totals::schema")]
    pub states: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedProfile {
    /// Profile name.
    pub name: String,
    /// The profile generation the agent acted on.
    pub generation: i64,
    /// The profile's mode.
    pub mode: Mode,
    /// Keys of this profile another profile overrides here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overridden_keys: Vec<String>,
    /// The revision (`status.rollout.revisions`) the agent applied; only for profiles with
    /// `spec.rollout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SysctlEntry {
    /// The sysctl key, canonical dotted form.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The value the winning profile asks for.
    pub desired: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The value read back from the kernel.
    pub actual: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The value before nodetune first changed it (from the node's ledger).
    pub original: Option<String>,
    /// The profile this entry's desired value comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// What the key reaches: `Node`, `NetworkNamespace` or `IPCNamespace`.
    pub scope: Scope,
    /// The profile marked the key optional (`-` prefix): Unsupported is then no failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// `Applied`, `DryRun`, `Unsupported`, `Invalid`, `Denied`, `Overridden`, `Failed` or
    /// `Restored`.
    pub state: KeyState,
    /// Why the key is not applied, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl SysctlEntry {
    /// Whether this entry counts as a failure: a failing state, except Unsupported for an
    /// optional key (the node still counts as applied).
    pub fn is_failure(&self) -> bool {
        self.state.is_failure() && !(self.optional && self.state == KeyState::Unsupported)
    }
}

/// Most [`PodSysctlEntry`] items a report holds (one per key of the pod-targeting profiles, as
/// many as a profile may hold keys).
pub const MAX_POD_SYSCTLS: usize = super::profile::MAX_SYSCTLS;
/// Most pods a [`PodSysctlEntry`] names: the counts cover every pod, the names only the first
/// few, so a node with hundreds of failing pods still writes a small report.
pub const MAX_NAMED_PODS: usize = 10;

/// One key of a pod-targeting profile across the selected pods of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSysctlEntry {
    /// The sysctl key, canonical dotted form.
    pub key: String,
    /// The profile the desired value comes from.
    pub profile: String,
    /// The value the profile asks for.
    pub desired: String,
    /// Selected pods on this node (running, not hostNetwork) that should hold the key.
    pub pods: i32,
    /// Pods holding the value (in DryRun: evaluated).
    pub applied: i32,
    /// Pods whose own `securityContext.sysctls` sets another value: the pod's value stays.
    #[serde(default)]
    pub conflicts: i32,
    /// Pods where the key was not applied (refused, unsupported or failed).
    #[serde(default)]
    pub failed: i32,
    /// The first pods in conflict or failed (namespace/name order), with why; at most
    /// [`MAX_NAMED_PODS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NAMED_PODS))]
    pub named: Vec<PodKeyOutcome>,
}

/// Why one pod does not hold a key of a pod-targeting profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodKeyOutcome {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// `Overridden` (the pod sets the key itself), or a failing state.
    pub state: KeyState,
    /// What happened, naming the value the pod holds or the error.
    pub message: String,
}

/// TCP sockets per state (netstat names), every state present. Maps here; one list on the wire
/// (see [`super::state_list`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "TcpCountsWire", into = "TcpCountsWire")]
pub struct TcpCounts {
    /// `netlink` or `procfs`.
    pub source: String,
    /// IPv4 sockets per state.
    pub ipv4: BTreeMap<String, i64>,
    /// IPv6 sockets per state.
    pub ipv6: BTreeMap<String, i64>,
    /// Both families per state.
    pub total: BTreeMap<String, i64>,
}

/// TCP sockets per state (netstat names), every state present.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "TcpCounts")]
struct TcpCountsWire {
    /// `netlink` or `procfs`.
    #[serde(default)]
    source: String,
    /// Sockets per state, IPv4, IPv6 and both, in kernel state order.
    #[serde(default)]
    states: FamilyMaps,
}

impl From<TcpCountsWire> for TcpCounts {
    fn from(w: TcpCountsWire) -> Self {
        TcpCounts {
            source: w.source,
            ipv4: w.states.ipv4,
            ipv6: w.states.ipv6,
            total: w.states.total,
        }
    }
}

impl From<TcpCounts> for TcpCountsWire {
    fn from(c: TcpCounts) -> Self {
        TcpCountsWire {
            source: c.source,
            states: FamilyMaps {
                ipv4: c.ipv4,
                ipv6: c.ipv6,
                total: c.total,
            },
        }
    }
}

impl JsonSchema for TcpCounts {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        TcpCountsWire::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        TcpCountsWire::json_schema(generator)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SockstatSummary {
    /// TIME_WAIT buckets in use (`tw` in /proc/net/sockstat).
    #[serde(default)]
    pub time_wait: i64,
    /// `net.ipv4.tcp_max_tw_buckets`.
    #[serde(default)]
    pub max_tw_buckets: i64,
    /// Orphaned TCP sockets (`orphan` in /proc/net/sockstat).
    #[serde(default)]
    pub orphans: i64,
    /// TCP sockets in use (`inuse` in /proc/net/sockstat).
    #[serde(default)]
    pub inuse: i64,
    /// `net.ipv4.ip_local_port_range`.
    #[serde(default)]
    pub local_port_range: String,
    /// TIME_WAIT sockets the kernel destroyed early because `tcp_max_tw_buckets` was reached
    /// (`TCPTimeWaitOverflow` of `/proc/net/netstat`, since the namespace was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_wait_overflows: Option<i64>,
}

/// Flat figures for printer columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportSummary {
    /// Comma-separated names of the matching profiles.
    #[serde(default)]
    pub profiles: String,
    /// Keys applied (or evaluated, in DryRun).
    #[serde(default)]
    pub applied: i32,
    /// Keys not applied: Unsupported, Invalid, Denied or Failed.
    #[serde(default)]
    pub failed: i32,
}
