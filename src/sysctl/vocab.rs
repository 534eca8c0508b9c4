//! The per-key vocabulary of the engine: which namespace a key lives in, and what happened to it.
//! The CRDs re-export these types (`crate::api`), so the engine never depends on the API types.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which kernel namespace a sysctl lives in: tells the user whether a value set on the host
/// reaches pods that run in namespaces of their own.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Scope {
    /// Global to the node (e.g. `vm.*`, most of `kernel.*`, `fs.*`).
    Node,
    /// Per network namespace (`net.*`): pods without hostNetwork keep their own copy.
    NetworkNamespace,
    /// Per IPC namespace (`kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`).
    #[serde(rename = "IPCNamespace")]
    IpcNamespace,
}

impl Scope {
    /// The name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "Node",
            Self::NetworkNamespace => "NetworkNamespace",
            Self::IpcNamespace => "IPCNamespace",
        }
    }
}

/// The outcome for one sysctl key on one node.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum KeyState {
    /// The kernel holds the desired value (written now or already equal).
    Applied,
    /// DryRun mode: nothing written; `desired` vs `actual` shows what would change.
    DryRun,
    /// The running kernel has no such key (e.g. `net.ipv4.tcp_tw_recycle`, removed in Linux 4.12).
    Unsupported,
    /// The kernel refused the value (EINVAL) or the key is malformed.
    Invalid,
    /// Refused by policy (denylist) or by the kernel (EPERM, EACCES, EROFS).
    Denied,
    /// Another profile with higher priority sets this key on this node.
    Overridden,
    /// Written but read back different, or another I/O error.
    Failed,
    /// The original value was put back because no profile wants the key any more.
    Restored,
    /// Another writer keeps changing the key back: the agent leaves it alone for a while
    /// before correcting it again (the report's `contested` names the foreign value).
    Contested,
}

impl KeyState {
    /// Whether this state counts as a failure for roll-ups and exit codes.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::Unsupported | Self::Invalid | Self::Denied | Self::Failed
        )
    }
}
