//! "Did you mean": the nearest sysctl a node has, for a key it lacks. A misspelled key is
//! otherwise just `Unsupported`, which reads like a kernel difference, not a typo.
use std::path::Path;

use super::SysctlKey;

/// Most files looked at for one suggestion: a node's whole `/proc/sys` has a few thousand
/// (more with many interfaces); the walk stops here whatever the tree holds.
pub const MAX_CANDIDATES: usize = 10_000;
/// Deepest directory level walked below the starting directory.
const MAX_DEPTH: usize = 6;

/// The key under `root` (a sysctl tree, normally `/proc/sys`) nearest to `missing` by edit
/// distance, if one is near enough to be a likely typo: at most 3 edits, and fewer than a
/// quarter of the key's length. The walk starts in the deepest directory of `missing`'s path
/// that exists, so the common case (a typo in the last part) reads one directory.
pub fn nearest(root: &Path, missing: &SysctlKey) -> Option<String> {
    let want = missing.path();
    let mut start = Path::new(want).parent();
    while let Some(dir) = start {
        if dir.as_os_str().is_empty() || root.join(dir).is_dir() {
            break;
        }
        start = dir.parent();
    }
    let start = start.unwrap_or(Path::new(""));
    let mut candidates = Vec::new();
    collect(root, start, 0, &mut candidates);
    let limit = (want.len() / 4).min(3);
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(want, c), c))
        .filter(|(d, c)| *d > 0 && *d <= limit && c.as_str() != want)
        .min()
        .and_then(|(_, c)| SysctlKey::parse(c).ok())
        .map(|k| k.dotted())
}

/// Regular files below `root/rel`, as paths relative to `root`, until [`MAX_CANDIDATES`].
/// Symlinks are not followed (sysctl trees have none worth suggesting).
fn collect(root: &Path, rel: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= MAX_CANDIDATES {
            return;
        }
        let Ok(kind) = e.file_type() else { continue };
        let path = rel.join(e.file_name());
        if kind.is_file() {
            if let Some(s) = path.to_str() {
                out.push(s.to_owned());
            }
        } else if kind.is_dir() && depth < MAX_DEPTH {
            collect(root, &path, depth + 1, out);
        }
    }
}

/// `message` with the suggestion appended, when there is one.
pub fn with_hint(message: Option<String>, root: &Path, missing: &SysctlKey) -> Option<String> {
    match nearest(root, missing) {
        Some(k) => Some(format!(
            "{}; did you mean `{k}`?",
            message.unwrap_or_else(|| format!("no sysctl {}", missing.dotted()))
        )),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tmp");
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, "1\n").expect("write");
        }
        dir
    }

    fn key(s: &str) -> SysctlKey {
        SysctlKey::parse(s).expect("key")
    }

    #[test]
    fn suggests_the_nearest_key_for_a_typo() {
        let t = tree(&[
            "net/ipv4/tcp_fin_timeout",
            "net/ipv4/tcp_tw_reuse",
            "net/ipv4/tcp_max_tw_buckets",
            "net/core/somaxconn",
            "vm/swappiness",
        ]);
        let near = |k: &str| nearest(t.path(), &key(k));
        assert_eq!(
            near("net.ipv4.tcp_fin_timeot").as_deref(),
            Some("net.ipv4.tcp_fin_timeout")
        );
        // A typo in a directory: the walk starts higher up.
        assert_eq!(
            near("net.ipv5.tcp_tw_reuse").as_deref(),
            Some("net.ipv4.tcp_tw_reuse")
        );
        assert_eq!(near("vm.swapiness").as_deref(), Some("vm.swappiness"));
        // Nothing close: no guess.
        assert_eq!(near("net.ipv4.tcp_tw_recycle"), None);
        assert_eq!(near("kernel.foo"), None);
        let msg = with_hint(Some("no such key".into()), t.path(), &key("vm.swapiness"));
        assert_eq!(
            msg.as_deref(),
            Some("no such key; did you mean `vm.swappiness`?")
        );
    }

    #[test]
    fn the_walk_is_bounded() {
        let dir = tempfile::tempdir().expect("tmp");
        let many = dir.path().join("net/ipv4");
        std::fs::create_dir_all(&many).expect("mkdir");
        for i in 0..(MAX_CANDIDATES + 50) {
            std::fs::write(many.join(format!("k{i}")), "1\n").expect("write");
        }
        let mut out = Vec::new();
        collect(dir.path(), Path::new(""), 0, &mut out);
        assert_eq!(out.len(), MAX_CANDIDATES);
    }
}
