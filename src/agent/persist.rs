//! Persistence (`spec.persist: true`): the agent also writes the persistent keys it applied to
//! one file of its own in the host's `/etc/sysctl.d`, so systemd-sysctl sets them at boot,
//! before the agent runs.
//!
//! * The name [`FILE_NAME`] sorts after the usual files (`99-sysctl.conf`,
//!   `99-kubernetes-cri.conf`, ...): systemd-sysctl reads all sysctl.d files in name order over
//!   its directories and the last assignment of a key wins (sysctl.d(5)), so ours wins over the
//!   distribution's and the admin's files unless one sorts after it.
//! * Written atomically: a temporary file in the same directory, fsync, rename over the name,
//!   fsync the directory. A crash leaves either the old or the new file (and at worst a stale
//!   temporary file, removed by the next write). The directory is opened through the host root
//!   with `openat2(RESOLVE_IN_ROOT)`, like [`crate::sysctl::hostconf`], and every name inside it
//!   with `O_NOFOLLOW`, so no planted link can redirect the write.
//! * Recorded in the ledger ([`Ledger::set_persisted`]) before the file gains keys and after it
//!   loses them, so a restore or an uninstall always knows to remove it.
//! * Reconciled every pass from what the pass applied: a SIGKILL between the sysctl write and
//!   the file write leaves a file that differs, and the next pass rewrites it.
//! * Only keys the pass applied and verified (Enforce, state `Applied`) of host-targeting
//!   profiles: pod-targeting profiles never reach the host merge, so pod keys are never written.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::api::{KeyState, NodeTuningProfile};
use crate::plan::Merged;
use crate::sysctl::{KeyResult, Ledger, LedgerError, SysctlKey};

/// nodetune's file in the host's `/etc/sysctl.d` (see the module docs for the name).
pub const FILE_NAME: &str = "99-zz-nodetune.conf";
/// The directory, relative to the host root.
pub const DIR: &str = "etc/sysctl.d";
const TEMP_NAME: &str = ".99-zz-nodetune.conf.tmp";
/// Largest file read back for comparison: 256 keys of at most 4 KiB values and a header.
const MAX_READ: u64 = 2 << 20;

/// Writing or removing the persistence file failed; the keys stay applied in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("no host root at {0}: persistence needs the agent's host mount")]
    NoHostRoot(PathBuf),
    #[error(
        "/{DIR} on the host is read-only for the agent (persistence needs agent.persist in the chart): {0}"
    )]
    ReadOnly(io::Error),
    #[error("/{DIR}/{name} on the host: {action}: {source}")]
    Io {
        name: &'static str,
        action: &'static str,
        source: io::Error,
    },
    #[error("the ledger could not record the persisted keys: {0}")]
    Ledger(#[from] LedgerError),
}

/// The keys to persist this pass, key (dotted) → value: the applied keys whose winning profile
/// sets `persist: true`, when the policy allows persistence. Pure.
pub fn wanted(
    merged: &Merged,
    matched: &[&NodeTuningProfile],
    results: &[KeyResult],
    allowed: bool,
) -> BTreeMap<String, String> {
    if !allowed {
        return BTreeMap::new();
    }
    let persists = |profile: &str| {
        matched.iter().any(|p| {
            p.metadata.name.as_deref() == Some(profile) && p.spec.persist && !p.spec.targets_pods()
        })
    };
    // `execute` returns the desired keys first, in `merged.desired` order.
    merged
        .desired
        .iter()
        .zip(results)
        .filter(|((_, d), r)| r.state == KeyState::Applied && persists(&d.profile))
        .filter(|((_, d), _)| !d.value.chars().any(char::is_control))
        .map(|((k, d), _)| (k.clone(), d.value.clone()))
        .collect()
}

/// The profile names that asked for persistence although the policy forbids it (for a warning).
pub fn refused(matched: &[&NodeTuningProfile], allowed: bool) -> Vec<String> {
    if allowed {
        return Vec::new();
    }
    matched
        .iter()
        .filter(|p| p.spec.persist)
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

/// The file's content for `keys`. Every line starts with `-`: a key missing at boot (an
/// interface not up yet, a module not loaded) must not make systemd-sysctl fail. Pure.
pub fn render(keys: &BTreeMap<String, String>) -> String {
    let mut out = String::from(
        "# Written by nodetune (NodeTuningProfiles with persist: true). Do not edit: the agent\n\
         # rewrites this file when the profiles change and removes it when none persists.\n",
    );
    for (k, v) in keys {
        out.push_str(&format!("-{k} = {}\n", v.trim()));
    }
    out
}

/// What a sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// The file was written or removed this pass (not only checked).
    pub changed: bool,
    /// The keys now in the file.
    pub keys: Vec<String>,
}

/// Brings the host's file and the ledger to `wanted` (empty: no file). Idempotent: a pass
/// after a crash finds the difference and repairs it.
pub fn sync(
    host_root: &Path,
    ledger: &mut Ledger,
    wanted: &BTreeMap<String, String>,
) -> Result<Synced, PersistError> {
    let keys: BTreeSet<SysctlKey> = wanted
        .keys()
        .filter_map(|k| SysctlKey::parse(k).ok())
        .collect();
    let names = wanted.keys().cloned().collect();
    if wanted.is_empty() && ledger.persisted().is_empty() {
        return Ok(Synced::default());
    }
    let dir = match open_dir(host_root) {
        Ok(dir) => dir,
        // Nothing wanted and nowhere to look: forget the record (the mount is gone for good,
        // or never was; the file cannot be reached either way).
        Err(_) if wanted.is_empty() => {
            ledger.set_persisted(BTreeSet::new())?;
            return Ok(Synced::default());
        }
        Err(e) => return Err(e),
    };
    if wanted.is_empty() {
        let changed = remove(&dir)?;
        ledger.set_persisted(BTreeSet::new())?;
        return Ok(Synced {
            changed,
            keys: names,
        });
    }
    let content = render(wanted);
    let changed = read_current(&dir).as_deref() != Some(content.as_str());
    if changed {
        // Before the file gains keys, the ledger knows them all (old and new).
        ledger.set_persisted(ledger.persisted().union(&keys).cloned().collect())?;
        write(&dir, &content)?;
    }
    ledger.set_persisted(keys)?;
    Ok(Synced {
        changed,
        keys: names,
    })
}

fn io(name: &'static str, action: &'static str) -> impl FnOnce(rustix::io::Errno) -> PersistError {
    move |e| match e {
        rustix::io::Errno::ROFS | rustix::io::Errno::ACCESS | rustix::io::Errno::PERM => {
            PersistError::ReadOnly(e.into())
        }
        e => PersistError::Io {
            name,
            action,
            source: e.into(),
        },
    }
}

/// `<root>/etc/sysctl.d`, resolved as if the host root were `/`.
fn open_dir(host_root: &Path) -> Result<OwnedFd, PersistError> {
    let root = match rustix::fs::open(
        host_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => {
            return Err(PersistError::NoHostRoot(host_root.to_owned()));
        }
        Err(e) => return Err(io("", "open the host root")(e)),
    };
    rustix::fs::openat2(
        &root,
        DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(io("", "open the directory"))
}

/// The file as it is now; `None` when missing, not a regular file, too large or unreadable
/// (all of which a write replaces).
fn read_current(dir: &OwnedFd) -> Option<String> {
    let fd = rustix::fs::openat(
        dir,
        FILE_NAME,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_READ)
        .read_to_end(&mut bytes)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Temp file (created afresh, `O_EXCL | O_NOFOLLOW`), write, fsync, rename, fsync the directory.
fn write(dir: &OwnedFd, content: &str) -> Result<(), PersistError> {
    match rustix::fs::unlinkat(dir, TEMP_NAME, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(io(TEMP_NAME, "remove a stale temporary file")(e)),
    }
    let fd = rustix::fs::openat(
        dir,
        TEMP_NAME,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(io(TEMP_NAME, "create"))?;
    let written = write_all(&fd, content.as_bytes()).and_then(|()| rustix::fs::fsync(&fd));
    drop(fd);
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(dir, TEMP_NAME, AtFlags::empty());
        return Err(io(TEMP_NAME, "write")(e));
    }
    rustix::fs::renameat(dir, TEMP_NAME, dir, FILE_NAME).map_err(io(FILE_NAME, "rename"))?;
    rustix::fs::fsync(dir).map_err(io(FILE_NAME, "fsync the directory"))
}

fn write_all(fd: &OwnedFd, mut bytes: &[u8]) -> rustix::io::Result<()> {
    while !bytes.is_empty() {
        let n = rustix::io::write(fd, bytes)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Removes the file; whether there was one.
fn remove(dir: &OwnedFd) -> Result<bool, PersistError> {
    match rustix::fs::unlinkat(dir, FILE_NAME, AtFlags::empty()) {
        Ok(()) => {
            rustix::fs::fsync(dir).map_err(io(FILE_NAME, "fsync the directory"))?;
            Ok(true)
        }
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(io(FILE_NAME, "remove")(e)),
    }
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
