//! nodetune: declarative sysctl tuning and TCP state reporting for Kubernetes nodes.
// The only unsafe code is in tcpstat::sys (netlink socket) and podnet::sys (pidfd, setns),
// which allow it.
#![deny(unsafe_code)]
pub mod agent;
pub mod api;
pub mod backoff;
pub mod conditions;
pub mod controller;
pub mod convert;
pub mod duration;
pub mod http;
pub mod manifest;
#[cfg(test)]
pub(crate) mod mock_api;
pub mod names;
pub mod plan;
pub mod podnet;
pub mod podtune;
pub mod selector;
pub mod sysctl;
pub mod tcpstat;
pub mod text;
pub mod top;
pub mod uninstall;
pub mod watch;
