//! The CRD types (`nodetune.dev/v1alpha1`) and the vocabulary shared by the engine and the reports.
//! No I/O here.
pub mod crd;
pub mod profile;
pub mod report;
mod schema;
mod vocab;

pub use profile::{
    Mode, NodeSummary, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningProfileStatus,
};
pub use report::{
    AppliedProfile, NodeTuningReport, NodeTuningReportSpec, NodeTuningReportStatus, ReportSummary,
    SockstatSummary, SysctlEntry, TcpCounts,
};
pub use schema::sysctls_rules;
pub use vocab::{KeyState, Scope};
