//! The CRD types (`nodetune.dev/v1alpha1`). No I/O here. The per-key vocabulary ([`KeyState`],
//! [`Scope`]) belongs to the sysctl engine and is re-exported here, so `api` depends on `sysctl`
//! and never the other way round.
pub mod crd;
pub mod profile;
pub mod report;
pub mod rollout;
mod schema;
pub mod state_list;

pub use crate::sysctl::{KeyState, Scope};
pub use profile::{
    Mode, NodeSummary, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningProfileStatus,
    PodKeyTotal,
};
pub use report::{
    AppliedProfile, ContestedKey, MAX_CONTESTED, MAX_TOP_PODS, NodeTuningReport,
    NodeTuningReportSpec, NodeTuningReportStatus, PodKeyOutcome, PodSysctlEntry, PodTcp, PodsTcp,
    ReportSummary, SockstatSummary, SysctlEntry, TcpCounterReport, TcpCounterValue, TcpCounts,
};
pub use schema::sysctls_rules;
