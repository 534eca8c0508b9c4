//! nodetune: declarative sysctl tuning and TCP state reporting for Kubernetes nodes.
pub mod api;
pub mod sysctl;
pub mod tcpstat;
