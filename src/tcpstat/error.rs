//! Errors of the TCP state counter.

use std::io;
use std::path::PathBuf;

/// A line of a `/proc` text file that could not be understood. Pure parsers return this; the
/// I/O layer wraps it with the file's path in [`TcpStatError::Parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number (0 when the problem is the file as a whole, e.g. a missing line).
    pub line: usize,
    pub reason: String,
}

impl ParseError {
    pub(crate) fn new(line: usize, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

/// Why a TCP snapshot could not be taken. Kernel data never panics: every surprise ends here.
#[derive(Debug, thiserror::Error)]
pub enum TcpStatError {
    /// No sock_diag here (no netlink, seccomp, no `inet_diag`): the automatic source falls back
    /// to procfs on this error.
    #[error("netlink sock_diag is unavailable: {0}")]
    NetlinkUnavailable(#[source] io::Error),

    /// A send or receive on the sock_diag socket failed.
    #[error("netlink sock_diag {op} failed: {source}")]
    NetlinkIo {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The kernel answered the dump with `NLMSG_ERROR` (or a negative `NLMSG_DONE`).
    #[error("kernel refused the sock_diag dump: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { errno: i32 },

    /// A netlink message whose lengths or payload do not add up.
    #[error("malformed netlink message at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },

    /// The kernel flagged the dump as inconsistent (`NLM_F_DUMP_INTR`).
    #[error("sock_diag dump was interrupted by a concurrent change (NLM_F_DUMP_INTR)")]
    DumpInterrupted,

    /// A datagram did not fit the receive buffer, so its tail was lost.
    #[error("netlink datagram of {len} bytes was truncated to the {capacity}-byte buffer")]
    DatagramTruncated { len: usize, capacity: usize },

    /// A socket in a state number this crate does not know.
    #[error("kernel reported unknown TCP state {0}")]
    UnknownState(u8),

    /// A `/proc` file could not be read.
    #[error("reading {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A `/proc` file could not be parsed.
    #[error("parsing {}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}
