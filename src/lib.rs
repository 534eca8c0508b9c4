//! nodetune: declarative sysctl tuning and TCP state reporting for Kubernetes nodes.
// The only unsafe code is tcpstat::sys (the NETLINK_SOCK_DIAG socket) and podnet::sys (pidfd,
// setns), which allow it for themselves; the state directory's *at calls go through rustix, so
// they need none here.
#![deny(unsafe_code)]
pub mod agent;
pub mod api;
pub mod backoff;
pub mod bounded_read;
pub mod conditions;
pub mod controller;
pub mod convert;
mod duration;
pub mod http;
pub mod manifest;
#[cfg(test)]
pub(crate) mod mock_api;
pub mod names;
pub mod plan;
pub mod podnet;
pub mod podtune;
pub mod rollout_cmd;
pub mod selector;
mod status_write;
pub mod sysctl;
pub mod tcpstat;
#[cfg(test)]
mod test_fixtures;
mod text;
pub mod top;
pub mod uninstall;
mod watch;
