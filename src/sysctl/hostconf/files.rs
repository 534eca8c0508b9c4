//! Finding and reading the host's sysctl.d files under a host root (the agent's read-only host
//! mount, or a directory given to `nodetune plan --host-root`).
//!
//! Every path is opened with `openat2(RESOLVE_IN_ROOT)`: the kernel resolves symlinks and `..`
//! as if the host root were `/`, so a link like `/etc/sysctl.d/99-sysctl.conf -> ../sysctl.conf`
//! works as on the host, and no link can lead out of the root (an absolute target such as
//! `/etc/shadow` means `<root>/etc/shadow`). Everything read is bounded: [`MAX_FILES`] names,
//! [`MAX_FILE_BYTES`] per file and [`MAX_TOTAL_BYTES`] in all; files are opened non-blocking
//! and must be regular files, so a FIFO or a device cannot hang or flood the agent.
use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// The sysctl.d directories, highest precedence first (sysctl.d(5)): a file name in an earlier
/// directory masks the same name in the later ones. `/lib/sysctl.d` is skipped where `/lib` is
/// the same directory as `/usr/lib` (merged /usr).
pub const SYSCTL_D_DIRS: [&str; 5] = [
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];
/// Read after every sysctl.d file, unless one of them already is this file (distributions link
/// it in as `99-sysctl.conf`).
pub const SYSCTL_CONF: &str = "/etc/sysctl.conf";
/// Most `*.conf` names considered over all directories.
pub const MAX_FILES: usize = 1024;
/// Largest file read; a sysctl.d file is a few hundred bytes, a commented sysctl.conf a few KiB.
pub const MAX_FILE_BYTES: u64 = 256 << 10;
/// Most bytes read over all files in one pass (the agent reads them every pass).
pub const MAX_TOTAL_BYTES: u64 = 2 << 20;

/// A file to read, in the order systemd-sysctl reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The path as the host sees it (`/etc/sysctl.d/10-net.conf`).
    pub host_path: String,
    /// A symlink to `/dev/null` (or an empty file): it masks the name and sets nothing.
    pub masked: bool,
}

/// The host's file system, held open by descriptor.
pub struct HostRoot {
    root: OwnedFd,
    path: PathBuf,
}

/// `(device, inode)`: two paths naming one file.
type FileId = (u64, u64);

impl HostRoot {
    /// Opens `path` as the host root; `Ok(None)` when it does not exist (the feature is off).
    pub fn open(path: &Path) -> io::Result<Option<Self>> {
        match rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(root) => Ok(Some(Self {
                root,
                path: path.to_owned(),
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The root's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a host path inside the root (see the module docs).
    fn open_in(&self, host_path: &str, extra: OFlags) -> io::Result<OwnedFd> {
        let relative = host_path.trim_start_matches('/');
        rustix::fs::openat2(
            &self.root,
            relative,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | extra,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(io::Error::from)
    }

    /// The `*.conf` files of the sysctl.d directories, by file name, each name from the
    /// directory of highest precedence that has it. Problems go to `warnings`.
    pub fn sources(&self, warnings: &mut Vec<String>) -> Vec<Source> {
        let mut by_name: BTreeMap<String, Source> = BTreeMap::new();
        let mut seen_dirs: HashSet<FileId> = HashSet::new();
        for dir in SYSCTL_D_DIRS {
            let fd = match self.open_in(dir, OFlags::DIRECTORY) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warnings.push(format!("host config: cannot open {dir}: {e}"));
                    continue;
                }
            };
            // /lib -> usr/lib: the same directory twice would only repeat its files.
            if let Ok(st) = rustix::fs::fstat(&fd)
                && !seen_dirs.insert((st.st_dev, st.st_ino))
            {
                continue;
            }
            for (name, masked) in conf_names(&fd, dir, warnings) {
                if by_name.len() >= MAX_FILES && !by_name.contains_key(&name) {
                    warnings.push(format!(
                        "host config: more than {MAX_FILES} files in the sysctl.d directories; the rest are not read"
                    ));
                    return by_name.into_values().collect();
                }
                by_name.entry(name.clone()).or_insert_with(|| Source {
                    host_path: format!("{dir}/{name}"),
                    masked,
                });
            }
        }
        by_name.into_values().collect()
    }

    /// Reads every source in order, then `/etc/sysctl.conf` unless it was one of them:
    /// `(host path, text)` pairs, at most [`MAX_TOTAL_BYTES`] in all.
    pub fn read_all(
        &self,
        sources: &[Source],
        warnings: &mut Vec<String>,
    ) -> Vec<(String, String)> {
        let mut read = Vec::new();
        let mut ids: HashSet<FileId> = HashSet::new();
        let mut budget = MAX_TOTAL_BYTES;
        for s in sources.iter().filter(|s| !s.masked) {
            if budget == 0 {
                warnings.push(format!(
                    "host config: {MAX_TOTAL_BYTES} bytes read; {} and the files after it are not read",
                    s.host_path
                ));
                return read;
            }
            if let Some((id, text)) = self.read_one(&s.host_path, &mut budget, warnings) {
                ids.insert(id);
                read.push((s.host_path.clone(), text));
            }
        }
        if let Some((id, text)) = self.read_one(SYSCTL_CONF, &mut budget, warnings)
            && !ids.contains(&id)
        {
            read.push((SYSCTL_CONF.to_owned(), text));
        }
        read
    }

    /// One file, bounded; `None` (with a warning unless it is simply missing) when unusable.
    fn read_one(
        &self,
        host_path: &str,
        budget: &mut u64,
        warnings: &mut Vec<String>,
    ) -> Option<(FileId, String)> {
        let mut warn = |why: String| {
            warnings.push(format!("host config: {host_path} not read: {why}"));
            None
        };
        let fd = match self.open_in(host_path, OFlags::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => return warn(e.to_string()),
        };
        let st = match rustix::fs::fstat(&fd) {
            Ok(st) => st,
            Err(e) => return warn(e.to_string()),
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return warn("not a regular file".into());
        }
        let limit = MAX_FILE_BYTES.min(*budget);
        let mut bytes = Vec::new();
        if let Err(e) = std::fs::File::from(fd)
            .take(limit + 1)
            .read_to_end(&mut bytes)
        {
            return warn(e.to_string());
        }
        if bytes.len() as u64 > limit {
            if limit < MAX_FILE_BYTES {
                // The total is spent: the files after this one are not read either.
                *budget = 0;
            }
            return warn(format!(
                "larger than {limit} bytes (at most {MAX_FILE_BYTES} per file and {MAX_TOTAL_BYTES} in all are read)"
            ));
        }
        *budget -= bytes.len() as u64;
        match String::from_utf8(bytes) {
            Ok(text) => Some(((st.st_dev, st.st_ino), text)),
            Err(_) => warn("not UTF-8 text".into()),
        }
    }
}

/// The `*.conf` names in one directory (hidden names and names with control characters are
/// left out), each with whether it masks (a symlink to `/dev/null`).
fn conf_names(dir: &OwnedFd, shown: &str, warnings: &mut Vec<String>) -> Vec<(String, bool)> {
    let entries = match rustix::fs::Dir::read_from(dir) {
        Ok(d) => d,
        Err(e) => {
            warnings.push(format!("host config: cannot list {shown}: {e}"));
            return Vec::new();
        }
    };
    let mut names = Vec::new();
    for entry in entries.take(4 * MAX_FILES) {
        let Ok(entry) = entry else { break };
        let Ok(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".conf") {
            continue;
        }
        if name.chars().any(char::is_control) {
            warnings.push(format!(
                "host config: a file name with control characters in {shown} is ignored"
            ));
            continue;
        }
        let masked = rustix::fs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
            && rustix::fs::readlinkat(dir, name.as_str(), Vec::new())
                .is_ok_and(|t| t.as_bytes() == b"/dev/null");
        names.push((name, masked));
    }
    names
}
