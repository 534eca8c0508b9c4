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
