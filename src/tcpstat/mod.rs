//! TCP sockets per state in the current network namespace, plus the kernel's TIME_WAIT and
//! port limits.
//!
//! Counting uses netlink `sock_diag` (fast: two bytes read per socket): one walk of the kernel's
//! TCP table for both families where the kernel answers the legacy `TCPDIAG_GETSOCK` request,
//! else one dump per family; and falls back to parsing `/proc/net/tcp{,6}` where netlink is not
//! allowed. Everything that interprets kernel
//! bytes or text is a pure function, unit-tested on handcrafted input; the only `unsafe` is in
//! `sys`.
//!
//! Counts are those of the network namespace the calling process is in (a hostNetwork pod
//! counts the node's sockets). Note that the kernel walks one machine-wide TCP hash table for
//! every dump, so even an almost empty namespace pays for the machine's sockets.

pub mod counters;
mod error;
pub mod netlink;
pub mod procfs;
pub mod sockstat;
mod state;
mod sys;
mod table;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use error::{ParseError, TcpStatError};
pub use sockstat::{PortRange, Sockstat};
pub use state::{StateCounts, TcpState, UnknownStateName};
pub use table::render_table;

/// Where the counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// One netlink walk for both families (`TCPDIAG_GETSOCK`, `AF_UNSPEC`).
    #[serde(rename = "netlink-single-walk")]
    NetlinkSingleWalk,
    /// One netlink `SOCK_DIAG_BY_FAMILY` dump per family (two walks): kernels that do not
    /// answer the legacy request, or when forced.
    #[serde(rename = "netlink")]
    Netlink,
    /// `/proc/net/tcp` and `/proc/net/tcp6`.
    #[serde(rename = "procfs")]
    Procfs,
}

impl Source {
    /// `"netlink-single-walk"`, `"netlink"` or `"procfs"`, as serialised.
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::NetlinkSingleWalk => "netlink-single-walk",
            Source::Netlink => "netlink",
            Source::Procfs => "procfs",
        }
    }

    /// Whether the counts came from netlink (either walk).
    pub const fn is_netlink(self) -> bool {
        matches!(self, Source::NetlinkSingleWalk | Source::Netlink)
    }

    fn of_walk(walk: netlink::Walk) -> Self {
        match walk {
            netlink::Walk::Single => Source::NetlinkSingleWalk,
            netlink::Walk::PerFamily => Source::Netlink,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which source to use: `auto` (netlink, else procfs), or one forced (`--source procfs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SourceChoice {
    /// Netlink (one walk, else per family), falling back to procfs only when netlink is
    /// unavailable.
    #[default]
    Auto,
    /// Only netlink (one walk, else per family); unavailability is an error.
    Netlink,
    /// Only the per-family netlink dumps, never the one-walk request: the fallback path, for
    /// tests, benchmarks, and a kernel whose legacy answer one would distrust.
    NetlinkPerFamily,
    /// Only procfs.
    Procfs,
}

/// Not `auto`, `netlink`, `netlink-per-family` or `procfs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown source {0:?} (expected auto, netlink, netlink-per-family or procfs)")]
pub struct UnknownSource(pub String);

impl FromStr for SourceChoice {
    type Err = UnknownSource;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SourceChoice::Auto),
            "netlink" => Ok(SourceChoice::Netlink),
            "netlink-per-family" => Ok(SourceChoice::NetlinkPerFamily),
            "procfs" => Ok(SourceChoice::Procfs),
            other => Err(UnknownSource(other.to_owned())),
        }
    }
}

impl fmt::Display for SourceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceChoice::Auto => "auto",
            SourceChoice::Netlink => "netlink",
            SourceChoice::NetlinkPerFamily => "netlink-per-family",
            SourceChoice::Procfs => "procfs",
        })
    }
}

/// How to take a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotOptions {
    pub source: SourceChoice,
    /// Where procfs is mounted, normally `/proc`; a parameter so tests can point at fixtures.
    /// Netlink always counts the calling process's namespace, whatever this says.
    pub proc_root: PathBuf,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            source: SourceChoice::Auto,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// TCP sockets per state and family, with the namespace's sockstat, at one moment.
///
/// JSON: `{"source": "netlink-single-walk"|"netlink"|"procfs", "ipv4": {STATE: n, ...}, "ipv6": {...},
/// "total": {...}, "sockstat": {...}}`, every state present in each map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSnapshot {
    pub source: Source,
    pub ipv4: StateCounts,
    /// IPv6 sockets, IPv4-mapped ones included (they are IPv6 sockets, as `ss` counts them).
    pub ipv6: StateCounts,
    /// `ipv4 + ipv6`.
    pub total: StateCounts,
    pub sockstat: Sockstat,
}

/// Counts the calling process's network namespace: netlink, else procfs under `/proc`.
pub fn snapshot() -> Result<TcpSnapshot, TcpStatError> {
    snapshot_with(&SnapshotOptions::default())
}

/// Counts with an explicit source choice and procfs root.
pub fn snapshot_with(options: &SnapshotOptions) -> Result<TcpSnapshot, TcpStatError> {
    let (netlink::FamilyCounts { ipv4, ipv6 }, source) = count(options.source, &options.proc_root)?;
    let sockstat = sockstat::read_sockstat(&options.proc_root)?;
    Ok(TcpSnapshot {
        source,
        ipv4,
        ipv6,
        total: ipv4 + ipv6,
        sockstat,
    })
}

fn count(
    choice: SourceChoice,
    proc_root: &Path,
) -> Result<(netlink::FamilyCounts, Source), TcpStatError> {
    let from_procfs = |proc_root| {
        let (ipv4, ipv6) = procfs::count(proc_root)?;
        Ok((netlink::FamilyCounts { ipv4, ipv6 }, Source::Procfs))
    };
    match choice {
        SourceChoice::Netlink => {
            let (counts, walk) = netlink::count()?;
            Ok((counts, Source::of_walk(walk)))
        }
        SourceChoice::NetlinkPerFamily => Ok((netlink::count_per_family()?, Source::Netlink)),
        SourceChoice::Procfs => from_procfs(proc_root),
        SourceChoice::Auto => match netlink::count() {
            Ok((counts, walk)) => Ok((counts, Source::of_walk(walk))),
            Err(TcpStatError::NetlinkUnavailable(reason)) => {
                // Debug, not warn: the agent counts every interval and the source is reported.
                tracing::debug!(%reason, "netlink sock_diag unavailable, counting from procfs");
                from_procfs(proc_root)
            }
            Err(other) => Err(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_choice_parses_cli_values() {
        for choice in [
            SourceChoice::Auto,
            SourceChoice::Netlink,
            SourceChoice::NetlinkPerFamily,
            SourceChoice::Procfs,
        ] {
            assert_eq!(choice.to_string().parse(), Ok(choice));
        }
        assert!("ss".parse::<SourceChoice>().is_err());
    }

    #[test]
    fn sources_serialise_as_their_names() {
        for source in [Source::NetlinkSingleWalk, Source::Netlink, Source::Procfs] {
            assert_eq!(
                serde_json::to_value(source).ok(),
                Some(serde_json::Value::String(source.as_str().into()))
            );
            assert_eq!(source.is_netlink(), source != Source::Procfs);
        }
    }

    #[test]
    fn snapshot_json_has_the_documented_shape() {
        let snapshot = TcpSnapshot {
            source: Source::Procfs,
            ipv4: StateCounts::default(),
            ipv6: StateCounts::default(),
            total: StateCounts::default(),
            sockstat: Sockstat {
                tcp_inuse: 0,
                tcp_orphan: 0,
                tcp_tw: 0,
                tcp_alloc: 0,
                tcp_mem: 0,
                tcp6_inuse: None,
                tcp_max_tw_buckets: 131072,
                ip_local_port_range: PortRange {
                    low: 32768,
                    high: 60999,
                },
            },
        };
        let json = serde_json::to_value(&snapshot).expect("serialise");
        let object = json.as_object().expect("object");
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5);
        for key in ["source", "ipv4", "ipv6", "total", "sockstat"] {
            assert!(object.contains_key(key), "{key}");
        }
        assert_eq!(json["source"], "procfs");
        for family in ["ipv4", "ipv6", "total"] {
            let counts = json[family].as_object().expect("counts object");
            assert_eq!(counts.len(), 11, "{family}");
            assert!(counts.values().all(|v| v == 0), "{family}");
        }
        let back: TcpSnapshot = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, snapshot);
    }

    #[test]
    fn forced_procfs_reads_the_given_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("net")).expect("mkdir");
        std::fs::create_dir_all(root.join("sys/net/ipv4")).expect("mkdir");
        let line = "   0: 0100007F:A3F7 00000000:0000 0A 0 0 0 0 0 0\n";
        std::fs::write(root.join("net/tcp"), format!("  sl local\n{line}{line}")).expect("write");
        std::fs::write(root.join("net/tcp6"), format!("  sl local\n{line}")).expect("write");
        std::fs::write(
            root.join("net/sockstat"),
            "TCP: inuse 2 orphan 0 tw 0 alloc 3 mem 1\n",
        )
        .expect("write");
        std::fs::write(root.join("sys/net/ipv4/tcp_max_tw_buckets"), "5000\n").expect("write");
        std::fs::write(
            root.join("sys/net/ipv4/ip_local_port_range"),
            "1024 65000\n",
        )
        .expect("write");
        let snapshot = snapshot_with(&SnapshotOptions {
            source: SourceChoice::Procfs,
            proc_root: root.to_owned(),
        })
        .expect("snapshot");
        assert_eq!(snapshot.source, Source::Procfs);
        assert_eq!(snapshot.ipv4.get(TcpState::Listen), 2);
        assert_eq!(snapshot.ipv6.get(TcpState::Listen), 1);
        assert_eq!(snapshot.total.get(TcpState::Listen), 3);
        assert_eq!(snapshot.sockstat.tcp_max_tw_buckets, 5000);
    }
}
