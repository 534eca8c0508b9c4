//! Errors of pod namespace discovery and counting.
use std::io;
use std::path::PathBuf;

use crate::tcpstat::TcpStatError;

/// Why one namespace was not counted (the others still are), or discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// `/proc` could not be listed at all.
    #[error("listing {}: {source}", .path.display())]
    ListProc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The process chosen to enter by has exited: its pod is gone or restarting.
    #[error("process {pid} has exited")]
    Gone { pid: i32 },

    /// The PID now names another process than the one looked up (it was reused).
    #[error("process {pid} was replaced by another process (PID reused)")]
    PidReused { pid: i32 },

    /// The process is no longer in the namespace it was found in.
    #[error("process {pid} left network namespace {expected} (now {found})")]
    NamespaceChanged { pid: i32, expected: u64, found: u64 },

    /// A system call on the way in failed.
    #[error("{op} for process {pid}: {source}")]
    Sys {
        op: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },

    /// A per-namespace file could not be read or parsed.
    #[error("reading {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },

    /// The sock_diag walk inside the namespace failed.
    #[error("counting in network namespace {ns}: {source}")]
    Count {
        ns: u64,
        #[source]
        source: TcpStatError,
    },

    /// The counting thread could not be started or panicked.
    #[error("the namespace counting thread failed: {0}")]
    Thread(String),
}
