//! Counting inside other network namespaces, safely.
//!
//! Every entry pins the process first (`pidfd_open`), then checks that the pinned process is
//! the one looked up (same start time) and still in the namespace found (same inode): a PID
//! reused in between fails the start time, a process that moved fails the inode. Two tiers:
//!
//! - [`sockstat_all`]: `/proc/<pid>/net/sockstat{,6}` of each namespace (`inuse`, `tw` are per
//!   namespace), read from the host with no walk and no `setns`; the process is confirmed alive
//!   through its pidfd afterwards, so the file read was that process's namespace's;
//! - [`walk_all`]: the one-walk `sock_diag` count of `tcpstat`, from a netlink socket created
//!   after `setns(pidfd, CLONE_NEWNET)` on the one thread that enters pods' namespaces (see
//!   `podnet::worker`): it does nothing else and goes home after each pass, so no other work
//!   ever runs inside a pod's namespace.
//!
//! Both stop at the pass's deadline and namespace bound: the rest is reported as truncated.
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::PodNetError;
use super::procs::{self, NsId};
use super::sandbox::NsRef;
use super::sys;
use crate::tcpstat::netlink::{self, FamilyCounts};
use crate::tcpstat::{TcpStatError, procfs, sockstat};

/// Bounds on one pass, so that a node full of namespaces (or a hostile pod making them) delays
/// the host's tuning by at most `budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Namespaces counted per pass at most.
    pub max_namespaces: usize,
    /// Processes looked at per scan at most.
    pub max_processes: usize,
    /// Wall time for discovery and counting together.
    pub budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_namespaces: 256,
            max_processes: 100_000,
            budget: Duration::from_secs(2),
        }
    }
}

/// The per-namespace figures of `/proc/net/sockstat{,6}`: no walk needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsSockstat {
    /// TCP sockets in use, IPv4 and IPv6 (not TIME_WAIT).
    pub inuse: u64,
    /// TIME_WAIT sockets of both families.
    pub tw: u64,
}

/// A full count of one namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walked {
    pub counts: FamilyCounts,
    pub sockstat: NsSockstat,
}

/// The outcome per namespace, in the order given, and whether the bounds cut the pass short.
#[derive(Debug, Default)]
pub struct Pass<T> {
    pub results: Vec<(NsRef, Result<T, PodNetError>)>,
    pub truncated: bool,
}

/// Pins `target`'s process and checks it is still the one found, in the namespace found.
fn pin(proc_root: &Path, target: &NsRef) -> Result<OwnedFd, PodNetError> {
    let pid = target.pid;
    let pidfd = sys::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => PodNetError::Gone { pid },
        _ => PodNetError::Sys {
            op: "pidfd_open",
            pid,
            source,
        },
    })?;
    match procs::start_time_of(proc_root, pid) {
        Some(t) if t == target.start_time => {}
        Some(_) => return Err(PodNetError::PidReused { pid }),
        None => return Err(PodNetError::Gone { pid }),
    }
    check_ns(target, ns_of_pid(proc_root, pid)?)?;
    Ok(pidfd)
}

fn ns_of_pid(proc_root: &Path, pid: i32) -> Result<NsId, PodNetError> {
    procs::ns_of(&proc_root.join(pid.to_string()).join("ns/net"))
        .map_err(|_| PodNetError::Gone { pid })
}

fn check_ns(target: &NsRef, found: NsId) -> Result<(), PodNetError> {
    if found == target.ns {
        return Ok(());
    }
    Err(PodNetError::NamespaceChanged {
        pid: target.pid,
        expected: target.ns.ino,
        found: found.ino,
    })
}

fn read(path: PathBuf) -> Result<String, PodNetError> {
    std::fs::read_to_string(&path).map_err(|e| PodNetError::Read {
        path,
        reason: e.to_string(),
    })
}

/// `inuse` (both families) and `tw` from a namespace's `net/` directory.
fn sockstat_in(net_dir: &Path) -> Result<NsSockstat, PodNetError> {
    let path = net_dir.join("sockstat");
    let tcp = sockstat::parse_sockstat(&read(path.clone())?).map_err(|e| PodNetError::Read {
        path,
        reason: e.to_string(),
    })?;
    // IPv6 disabled: no such file and no IPv6 sockets.
    let path = net_dir.join("sockstat6");
    let tcp6 = match std::fs::read_to_string(&path) {
        Ok(text) => sockstat::parse_sockstat6(&text).map_err(|e| PodNetError::Read {
            path,
            reason: e.to_string(),
        })?,
        Err(_) => 0,
    };
    Ok(NsSockstat {
        inuse: tcp.inuse.saturating_add(tcp6),
        tw: tcp.tw,
    })
}

/// The cheap tier for one namespace: read from the host through the pinned process.
pub fn sockstat_of(proc_root: &Path, target: &NsRef) -> Result<NsSockstat, PodNetError> {
    let pidfd = pin(proc_root, target)?;
    let figures = sockstat_in(&proc_root.join(target.pid.to_string()).join("net"))?;
    // Alive after the read: the PID named the pinned process throughout.
    match sys::pidfd_alive(&pidfd) {
        Ok(true) => {}
        Ok(false) => return Err(PodNetError::Gone { pid: target.pid }),
        Err(source) => {
            return Err(PodNetError::Sys {
                op: "pidfd_send_signal",
                pid: target.pid,
                source,
            });
        }
    }
    check_ns(target, ns_of_pid(proc_root, target.pid)?)?;
    Ok(figures)
}

/// The cheap tier for every target, on the calling thread (no namespace is entered).
pub fn sockstat_all(
    proc_root: &Path,
    targets: &[NsRef],
    limits: &Limits,
    deadline: Instant,
) -> Pass<NsSockstat> {
    bounded(targets, limits, deadline, |t| sockstat_of(proc_root, t))
}

fn bounded<T>(
    targets: &[NsRef],
    limits: &Limits,
    deadline: Instant,
    mut each: impl FnMut(&NsRef) -> Result<T, PodNetError>,
) -> Pass<T> {
    let mut pass = Pass {
        results: Vec::with_capacity(targets.len().min(limits.max_namespaces)),
        truncated: false,
    };
    for (i, target) in targets.iter().enumerate() {
        if i >= limits.max_namespaces || Instant::now() >= deadline {
            pass.truncated = true;
            break;
        }
        pass.results.push((*target, each(target)));
    }
    pass
}

/// Enters `target`'s namespace on the calling thread: pins the process, `setns(pidfd)`, then
/// checks where the thread really is. The thread stays there until its job ends: only the
/// namespace thread, in [`inside_each`], calls this.
fn enter(proc_root: &Path, target: &NsRef) -> Result<(), PodNetError> {
    let pidfd = pin(proc_root, target)?;
    sys::setns_net(&pidfd).map_err(|source| PodNetError::Sys {
        op: "setns",
        pid: target.pid,
        source,
    })?;
    // Where the thread really is now, whatever happened to the process meanwhile.
    let here = procs::own_ns(proc_root).map_err(|e| PodNetError::Read {
        path: proc_root.join("thread-self/ns/net"),
        reason: e.to_string(),
    })?;
    check_ns(target, here)
}

/// Counts the namespace the calling thread is in (after [`enter`]).
fn count_here(proc_root: &Path, target: &NsRef) -> Result<Walked, PodNetError> {
    let thread_proc = proc_root.join("thread-self");
    let counts = match netlink::count() {
        Ok((counts, _)) => counts,
        Err(TcpStatError::NetlinkUnavailable(_)) => {
            let (ipv4, ipv6) =
                procfs::count(&thread_proc).map_err(|source| PodNetError::Count {
                    ns: target.ns.ino,
                    source,
                })?;
            FamilyCounts { ipv4, ipv6 }
        }
        Err(source) => {
            return Err(PodNetError::Count {
                ns: target.ns.ino,
                source,
            });
        }
    };
    let sockstat = sockstat_in(&thread_proc.join("net"))?;
    Ok(Walked { counts, sockstat })
}

/// Runs `work` inside each target's network namespace in turn, within the bounds, on the
/// namespace thread (see `podnet::worker`), which does nothing else: the one way into pods'
/// namespaces, for counting here and for anything else that must act inside them (a socket
/// created, or a `/proc/sys/net` file opened, by `work` belongs to that namespace).
pub fn inside_each<T, F>(
    proc_root: &Path,
    targets: &[NsRef],
    limits: &Limits,
    deadline: Instant,
    work: F,
) -> Result<Pass<T>, PodNetError>
where
    T: Send + 'static,
    F: Fn(&Path, &NsRef) -> Result<T, PodNetError> + Send + 'static,
{
    let proc_root = proc_root.to_owned();
    let targets = targets.to_vec();
    let limits = *limits;
    super::worker::run(move || {
        bounded(&targets, &limits, deadline, |t| {
            enter(&proc_root, t)?;
            work(&proc_root, t)
        })
    })
}

/// The full tier for every target: [`inside_each`] with the one-walk count.
pub fn walk_all(
    proc_root: &Path,
    targets: &[NsRef],
    limits: &Limits,
    deadline: Instant,
) -> Result<Pass<Walked>, PodNetError> {
    inside_each(proc_root, targets, limits, deadline, count_here)
}
