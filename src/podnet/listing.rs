//! `nodetune tcpstat --all-namespaces`: every network namespace on the machine, counted with the
//! full walk from inside, each named by its pod where it has one (like `ss -N` run in each).
//! Pods are named from the kubelet's log directories (`/var/log/pods/<ns>_<name>_<uid>`), which
//! need no API server; a pod without one is shown by UID.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::cgroup::PodUid;
use super::count::{self, Limits};
use super::error::PodNetError;
use crate::tcpstat::{StateCounts, TcpState};

/// Where the kubelet keeps pods' logs, one directory per pod.
pub const POD_LOG_DIR: &str = "/var/log/pods";

/// A pod as the listing names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodName {
    pub uid: String,
    /// Empty when no log directory names the pod.
    pub namespace: String,
    pub name: String,
}

/// One namespace's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NsLine {
    /// The namespace's inode (`ip netns identify`, `lsns -t net` show the same).
    pub inode: u64,
    /// The process entered by (the namespace's oldest).
    pub pid: i32,
    pub processes: usize,
    /// The pod whose sandbox namespace this is.
    pub pod: Option<PodName>,
    /// Not the pod's namespace, but made by a process of this pod.
    pub inside_pod: Option<PodName>,
    pub ipv4: StateCounts,
    pub ipv6: StateCounts,
    pub total: StateCounts,
    /// TIME_WAIT per the namespace's sockstat (includes orphaned FIN_WAIT2).
    pub sockstat_tw: u64,
    /// Why the namespace could not be counted (it is listed anyway).
    pub error: Option<String>,
}

/// Every namespace but the caller's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub namespaces: Vec<NsLine>,
    /// The bounds cut discovery or counting short.
    pub truncated: bool,
}

/// `(namespace, name, uid)` from a pod log directory's name. Namespace and pod names are DNS
/// names (no `_`), so the split is unambiguous; anything else is refused.
pub fn parse_log_dir(name: &str) -> Option<(String, String, PodUid)> {
    let mut parts = name.splitn(3, '_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (dns(ns) && dns(pod)).then_some(())?;
    Some((ns.to_string(), pod.to_string(), PodUid::parse(uid)?))
}

/// Pod names by UID from `dir` (missing directory: none).
pub fn pod_names(dir: &Path) -> BTreeMap<PodUid, (String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| parse_log_dir(e.file_name().to_str()?))
        .map(|(ns, name, uid)| (uid, (ns, name)))
        .collect()
}

fn named(uid: &PodUid, names: &BTreeMap<PodUid, (String, String)>) -> PodName {
    let (namespace, name) = names.get(uid).cloned().unwrap_or_default();
    PodName {
        uid: uid.to_string(),
        namespace,
        name,
    }
}

/// Discovers and counts every namespace under `proc_root`, within `limits`.
pub fn list(proc_root: &Path, log_dir: &Path, limits: &Limits) -> Result<Listing, PodNetError> {
    let deadline = Instant::now() + limits.budget;
    let (found, scan_truncated) = super::discover_all(proc_root, limits, deadline)?;
    let names = pod_names(log_dir);
    let targets: Vec<_> = found.iter().map(|n| n.target).collect();
    let walked = count::walk_all(proc_root, &targets, limits, deadline)?;
    let namespaces = found
        .iter()
        .zip(walked.results)
        .map(|(ns, (_, result))| {
            let (counts, tw, error) = match result {
                Ok(w) => (w.counts, w.sockstat.tw, None),
                Err(e) => (Default::default(), 0, Some(e.to_string())),
            };
            NsLine {
                inode: ns.target.ns.ino,
                pid: ns.target.pid,
                processes: ns.processes,
                pod: ns.pod.as_ref().map(|u| named(u, &names)),
                inside_pod: ns.inside_pod.as_ref().map(|u| named(u, &names)),
                ipv4: counts.ipv4,
                ipv6: counts.ipv6,
                total: counts.ipv4 + counts.ipv6,
                sockstat_tw: tw,
                error,
            }
        })
        .collect();
    Ok(Listing {
        namespaces,
        truncated: scan_truncated || walked.truncated,
    })
}

/// Printable: control characters escaped (names come from the filesystem).
fn shown(s: &str) -> String {
    s.chars().flat_map(char::escape_default).collect()
}

fn pod_column(line: &NsLine) -> String {
    let label = |p: &PodName| {
        if p.name.is_empty() {
            format!("pod {}", p.uid)
        } else {
            format!("{}/{}", shown(&p.namespace), shown(&p.name))
        }
    };
    match (&line.pod, &line.inside_pod) {
        (Some(p), _) => label(p),
        (None, Some(p)) => format!("(inside {})", label(p)),
        (None, None) => "-".into(),
    }
}

/// One line per namespace: inode, PID, pod, the main states and the total.
pub fn render_table(listing: &Listing) -> String {
    const STATES: [TcpState; 4] = [
        TcpState::Established,
        TcpState::TimeWait,
        TcpState::CloseWait,
        TcpState::Listen,
    ];
    let mut out = format!(
        "{:<12} {:>8} {:<40} {:>11} {:>9} {:>10} {:>6} {:>7}\n",
        "NETNS", "PID", "POD", "ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "LISTEN", "TOTAL"
    );
    for line in &listing.namespaces {
        let n = STATES.map(|s| line.total.get(s));
        out.push_str(&format!(
            "{:<12} {:>8} {:<40} {:>11} {:>9} {:>10} {:>6} {:>7}",
            line.inode,
            line.pid,
            pod_column(line),
            n[0],
            n[1],
            n[2],
            n[3],
            line.total.total()
        ));
        if let Some(e) = &line.error {
            out.push_str(&format!("  ({})", shown(e)));
        }
        out.push('\n');
    }
    if listing.truncated {
        out.push_str("(truncated: the time or namespace bound was reached)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d7c3b2a-55e1-4c8e-9f0a-1234567890ab";

    #[test]
    fn log_directories_name_pods_and_odd_ones_are_refused() {
        let (ns, name, uid) = parse_log_dir(&format!("web_squid-0_{UID}")).expect("parsed");
        assert_eq!(
            (ns.as_str(), name.as_str(), uid.as_str()),
            ("web", "squid-0", UID)
        );
        for bad in [
            format!("web_squid-0_{UID}_x"),
            format!("Web_squid_{UID}"),
            format!("_squid_{UID}"),
            "web_squid-0_notauid".to_string(),
            format!("web_sq\u{1b}[2J_{UID}"),
            "web".to_string(),
        ] {
            assert_eq!(parse_log_dir(&bad), None, "{bad:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(format!("web_squid-0_{UID}"))).expect("mkdir");
        std::fs::create_dir(dir.path().join("garbage")).expect("mkdir");
        let names = pod_names(dir.path());
        assert_eq!(names.len(), 1);
        assert!(pod_names(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn table_names_pods_nested_and_plain_namespaces() {
        let mut total = StateCounts::default();
        total.set(TcpState::TimeWait, 1478);
        let pod = PodName {
            uid: UID.into(),
            namespace: "web".into(),
            name: "squid-0".into(),
        };
        let line = |pod: Option<PodName>, inside: Option<PodName>| NsLine {
            inode: 4026532000,
            pid: 42,
            processes: 1,
            pod,
            inside_pod: inside,
            ipv4: total,
            ipv6: StateCounts::default(),
            total,
            sockstat_tw: 1478,
            error: None,
        };
        let unnamed = PodName {
            name: String::new(),
            namespace: String::new(),
            ..pod.clone()
        };
        let listing = Listing {
            namespaces: vec![
                line(Some(pod.clone()), None),
                line(None, Some(pod)),
                line(Some(unnamed), None),
                line(None, None),
            ],
            truncated: true,
        };
        let text = render_table(&listing);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("web/squid-0") && lines[1].contains("1478"),
            "{text}"
        );
        assert!(lines[2].contains("(inside web/squid-0)"), "{text}");
        assert!(lines[3].contains(&format!("pod {UID}")), "{text}");
        assert!(lines[4].contains(" - "), "{text}");
        assert!(text.ends_with("reached)\n"), "{text}");
    }
}
