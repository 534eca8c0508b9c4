//! Pods' network namespaces on this node: finding them from the host's `/proc` and counting
//! their TCP sockets from inside.
//!
//! - [`cgroup`]: which pod a process belongs to, from its cgroup path (pure);
//! - [`procs`]: one bounded scan of `/proc` (start time, namespace, pod per process);
//! - [`sandbox`]: which namespace is each pod's (its oldest process's), pure;
//! - [`count`]: entering safely (pidfd, start time and inode checks) and counting, in two tiers;
//! - [`tiers`]: the agent's schedule: the cheap tier every pass, the walk at the heartbeat;
//! - `worker`: the one long-lived thread that enters pods' namespaces.
//!
//! Cost model: by default every network namespace shares the kernel's one TCP hash table, so a
//! `sock_diag` walk in any namespace walks every socket of the machine. N pod namespaces walked
//! is N walks of the whole table; `sockstat` per namespace is no walk at all. Hence the tiers.
//! Needs `hostPID` (to see pods' processes) and `CAP_SYS_ADMIN` (for `setns`).
pub mod cgroup;
pub mod count;
mod error;
pub mod listing;
pub mod procs;
pub mod sandbox;
mod sys;
pub mod tiers;
mod worker;
pub mod workload;

pub use cgroup::PodUid;
pub use count::{Limits, NsSockstat, Walked};
pub use error::PodNetError;
pub use procs::NsId;
pub use sandbox::{AnyNs, NsRef, PodMap, PodNs};
pub use tiers::{PodCounter, PodCounts, PodPass};

use std::path::Path;
use std::time::Instant;

/// Scans `proc_root` and maps pods to their namespaces; `true` beside it when the scan was cut
/// short by its bounds.
pub fn discover(
    proc_root: &Path,
    limits: &Limits,
    deadline: Instant,
) -> Result<(PodMap, bool), PodNetError> {
    let (scan, host) = scan_beside_own(proc_root, limits, deadline)?;
    Ok((
        sandbox::pod_namespaces(&scan.processes, host),
        scan.truncated,
    ))
}

/// Every namespace on the machine but the caller's, each with its pod where it has one.
pub fn discover_all(
    proc_root: &Path,
    limits: &Limits,
    deadline: Instant,
) -> Result<(Vec<AnyNs>, bool), PodNetError> {
    let (scan, host) = scan_beside_own(proc_root, limits, deadline)?;
    Ok((
        sandbox::all_namespaces(&scan.processes, host),
        scan.truncated,
    ))
}

/// The processes under `proc_root` and the caller's own namespace, which both discoveries
/// leave out.
fn scan_beside_own(
    proc_root: &Path,
    limits: &Limits,
    deadline: Instant,
) -> Result<(procs::Scan, NsId), PodNetError> {
    let scan = procs::scan(proc_root, deadline, limits.max_processes)?;
    let host = procs::own_ns(proc_root).map_err(|e| PodNetError::Read {
        path: proc_root.join("thread-self/ns/net"),
        reason: e.to_string(),
    })?;
    Ok((scan, host))
}
