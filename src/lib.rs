//! nodetune: declarative sysctl tuning and TCP state reporting for Kubernetes nodes.
pub mod agent;
pub mod api;
pub mod controller;
pub mod convert;
pub mod duration;
pub mod http;
pub mod manifest;
pub mod plan;
pub mod selector;
pub mod sysctl;
pub mod tcpstat;
pub mod uninstall;
pub mod watch;
