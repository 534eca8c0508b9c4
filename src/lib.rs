//! nodetune: declarative sysctl tuning and TCP state reporting for Kubernetes nodes.
pub mod api;
pub mod convert;
pub mod http;
pub mod manifest;
pub mod plan;
pub mod selector;
pub mod sysctl;
pub mod tcpstat;
