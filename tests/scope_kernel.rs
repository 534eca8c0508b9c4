//! Kernel test for the scope table (`src/sysctl/scope.rs`): which `net.*` keys belong to a
//! network namespace and which are node-wide, derived from the running kernel instead of
//! believed.
//!
//! The truth: a key is per network namespace when a fresh namespace has its own writable copy.
//! A key the host can write but a fresh namespace cannot (the file is absent there, or mode 0444,
//! a read-only mirror of the host's value such as `net.netfilter.nf_conntrack_max`) is
//! node-wide: only the host's value counts, so a policy of `allowedScopes: [NetworkNamespace]`
//! must not let a profile set it. Files read-only on the host as well can be set nowhere; they
//! are listed, not compared.
//!
//! Per-interface directories (`conf/<if>/`, `neigh/<if>/`) differ between the host and a fresh
//! namespace (which has only `lo`), so keys are compared on the patterns the table uses: the
//! interface name becomes `<if>` (`all` and `default` stay), and a pattern is per-namespace when
//! any of its instances is writable in the fresh namespace.
//!
//! Needs root (to create a network namespace), and must run in the host's network namespace.
//! The helper only reads `/proc/sys/net`; nothing is written anywhere.

mod kernel;

use kernel::root_or_skip;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nodetune::api::Scope;
use nodetune::sysctl::SysctlKey;

/// Set only in the re-executed child.
const HELPER_ENV: &str = "NODETUNE_SCOPE_NETNS_HELPER";
/// The helper's listing is printed between these lines.
const BEGIN: &str = "---- begin /proc/sys/net ----";
const END: &str = "---- end /proc/sys/net ----";

/// Whether root may write a sysctl file (its mode is what the kernel enforces, even for root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Writable,
    ReadOnly,
}

/// path below `/proc/sys/net` (slash form) → access, as this process's namespace sees it.
type Listing = BTreeMap<String, Access>;

/// The derived truth for one pattern, with the instances it was derived from.
#[derive(Default)]
struct Pattern {
    host_writable: bool,
    fresh_present: bool,
    fresh_writable: bool,
    /// Every concrete key (both namespaces) that maps to the pattern.
    keys: BTreeSet<String>,
}

#[test]
fn net_scopes_match_what_a_fresh_namespace_can_write() {
    if !root_or_skip("net_scopes_match_what_a_fresh_namespace_can_write") {
        return;
    }
    let host = listing();
    let fresh = fresh_listing();
    let patterns = patterns(&host, &fresh);
    assert!(
        patterns
            .values()
            .any(|p| p.host_writable && !p.fresh_writable),
        "the host's /proc/sys/net looks like a fresh namespace's: run this test in the host's \
         network namespace (the initial one), not in a container's"
    );
    let mut mismatches = Vec::new();
    let (mut node, mut netns, mut read_only, mut unaddressable) = (0, 0, Vec::new(), Vec::new());
    for (name, p) in &patterns {
        let truth = match (p.host_writable, p.fresh_writable) {
            (_, true) => Scope::NetworkNamespace,
            (true, false) => Scope::Node,
            (false, false) => {
                read_only.push(name.as_str());
                continue;
            }
        };
        if truth == Scope::Node {
            node += 1;
        } else {
            netns += 1;
        }
        for key in &p.keys {
            // A name outside nodetune's key grammar (an interface with uppercase letters, say)
            // cannot be in a profile at all, so it has no scope to check.
            let Ok(said) = SysctlKey::parse(key).map(|k| k.scope()) else {
                unaddressable.push(key.as_str());
                continue;
            };
            if said != truth {
                let why = if p.fresh_present {
                    "read-only in a fresh namespace"
                } else {
                    "absent in a fresh namespace"
                };
                mismatches.push(format!(
                    "{key}: the table says {said:?}, the kernel says {truth:?} ({why})"
                ));
            }
        }
    }
    println!(
        "{} net.* patterns: {node} node-wide, {netns} per namespace; read-only everywhere \
         (not compared): {}; outside the key grammar (not compared): {}",
        patterns.len(),
        read_only.join(", "),
        if unaddressable.is_empty() {
            "none".to_owned()
        } else {
            unaddressable.join(", ")
        }
    );
    assert!(
        mismatches.is_empty(),
        "src/sysctl/scope.rs disagrees with this kernel on {} keys:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Not a test of its own: lists `/proc/sys/net` inside the namespace the test above creates.
#[test]
#[ignore = "helper: runs only inside the network namespace the test above creates"]
fn scope_netns_helper() {
    if kernel::helper_mode(HELPER_ENV).is_none() {
        return;
    }
    println!("{BEGIN}");
    for (path, access) in listing() {
        let tag = if access == Access::Writable { 'w' } else { 'r' };
        println!("{tag} {path}");
    }
    println!("{END}");
}

/// Re-runs this binary's helper under `unshare --net` and parses its listing.
fn fresh_listing() -> Listing {
    let stdout = kernel::run_test_in_fresh_netns("scope_netns_helper", HELPER_ENV, "1");
    let body = stdout
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .unwrap_or_else(|| panic!("the helper printed no listing:\n{stdout}"))
        .0;
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|line| match line.split_once(' ') {
            Some(("w", path)) => (path.to_owned(), Access::Writable),
            Some(("r", path)) => (path.to_owned(), Access::ReadOnly),
            _ => panic!("unexpected helper line {line:?}"),
        })
        .collect()
}

/// Every file below `/proc/sys/net` in this process's network namespace.
fn listing() -> Listing {
    let mut out = Listing::new();
    walk(Path::new("/proc/sys/net"), "", &mut out);
    assert!(!out.is_empty(), "/proc/sys/net has no files");
    out
}

fn walk(dir: &Path, rel: &str, out: &mut Listing) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("directory entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            walk(&entry.path(), &rel, out);
        } else {
            let access = if meta.permissions().mode() & 0o200 != 0 {
                Access::Writable
            } else {
                Access::ReadOnly
            };
            out.insert(rel, access);
        }
    }
}

/// Groups both listings by the pattern the table would use for them.
fn patterns(host: &Listing, fresh: &Listing) -> BTreeMap<String, Pattern> {
    let mut out: BTreeMap<String, Pattern> = BTreeMap::new();
    for (path, access) in host {
        let p = out.entry(pattern_of(path)).or_default();
        p.host_writable |= *access == Access::Writable;
        p.keys.insert(format!("net/{path}"));
    }
    for (path, access) in fresh {
        let p = out.entry(pattern_of(path)).or_default();
        p.fresh_present = true;
        p.fresh_writable |= *access == Access::Writable;
        p.keys.insert(format!("net/{path}"));
    }
    out
}

/// `ipv4/conf/eth0/rp_filter` → `net.ipv4.conf.<if>.rp_filter`; `all` and `default` stay.
fn pattern_of(path: &str) -> String {
    let mut parts: Vec<&str> = path.split('/').collect();
    if parts.len() >= 4
        && matches!(parts[1], "conf" | "neigh")
        && !matches!(parts[2], "all" | "default")
    {
        parts[2] = "<if>";
    }
    format!("net.{}", parts.join("."))
}

#[test]
fn patterns_fold_interfaces_only() {
    assert_eq!(
        pattern_of("ipv4/conf/eth0.100/rp_filter"),
        "net.ipv4.conf.<if>.rp_filter"
    );
    assert_eq!(
        pattern_of("ipv6/neigh/lo/retrans_time"),
        "net.ipv6.neigh.<if>.retrans_time"
    );
    assert_eq!(
        pattern_of("ipv4/conf/all/rp_filter"),
        "net.ipv4.conf.all.rp_filter"
    );
    assert_eq!(
        pattern_of("netfilter/nf_conntrack_max"),
        "net.netfilter.nf_conntrack_max"
    );
    assert_eq!(pattern_of("nf_conntrack_max"), "net.nf_conntrack_max");
}
