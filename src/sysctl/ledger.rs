//! The baseline ledger: the original value of every key nodetune changed, so it can be put back.
//!
//! Stored as `<state-dir>/ledger.json`:
//!
//! ```json
//! {
//!   "version": 1,
//!   "entries": [
//!     { "key": "net.ipv4.tcp_fin_timeout", "original": "60", "scope": "NetworkNamespace",
//!       "firstChangedUnix": 1764042000, "profile": "web" }
//!   ]
//! }
//! ```
//!
//! Rules:
//! * Only the *first* original of a key is kept: a later change of an already changed key does
//!   not overwrite it ([`Ledger::record_original`] returns `false`).
//! * Every mutation is persisted before the method returns, atomically (temp file in the same
//!   directory, write, fsync, rename, fsync the directory); callers record the original
//!   **before** writing the kernel, so a crash in between cannot lose it.
//! * A ledger that cannot be parsed is moved aside to `ledger.json.corrupt-<unix-secs>` and
//!   reported in [`LoadOutcome::set_aside`]; it is never silently overwritten. A ledger that
//!   cannot be *read* (permissions, I/O) or that a newer nodetune wrote is an error, and the file
//!   is left alone.
//! * One process at a time: a [`Ledger`] holds an exclusive `flock` on `<state-dir>/ledger.lock`
//!   while it lives; a second [`Ledger::load`] on the same directory fails with
//!   [`LedgerError::Locked`] (e.g. `restore --local` while the agent runs).

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::vocab::Scope;

use super::key::SysctlKey;

/// Default state directory of the node agent.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodetune";
/// File name of the ledger inside the state directory.
pub const LEDGER_FILE: &str = "ledger.json";
/// File name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "ledger.lock";
/// The ledger format this code reads and writes.
pub const FORMAT_VERSION: u64 = 1;

const TEMP_FILE: &str = ".ledger.json.tmp";

/// One key nodetune changed, with the value it had before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// The key (canonical dotted form on disk).
    pub key: SysctlKey,
    /// The value before nodetune first changed it, exactly as the kernel printed it.
    pub original: String,
    /// The key's scope at the time it was recorded.
    pub scope: Scope,
    /// When nodetune first changed it (seconds since the Unix epoch).
    pub first_changed_unix: u64,
    /// The profile that first changed it, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u64,
    entries: Vec<LedgerEntry>,
}

/// Loading or saving the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// An I/O operation on the state directory failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`"read"`, `"rename"`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process holds the ledger.
    #[error("the ledger in {} is in use by another nodetune process", path.display())]
    Locked {
        /// The state directory.
        path: PathBuf,
    },
    /// The ledger was written by a newer nodetune.
    #[error(
        "{} has format version {found}; this nodetune understands version {FORMAT_VERSION} and leaves it untouched",
        path.display()
    )]
    UnsupportedVersion {
        /// The ledger file.
        path: PathBuf,
        /// The version found in it.
        found: u64,
    },
    /// Serialising the ledger failed (should not happen).
    #[error("could not encode the ledger: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LedgerError + 'a {
    move |source| LedgerError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A corrupt ledger that [`Ledger::load`] moved out of the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    /// Where the corrupt file now is.
    pub moved_to: PathBuf,
    /// Why it could not be used.
    pub reason: String,
}

/// What [`Ledger::load`] found.
#[derive(Debug)]
pub struct LoadOutcome {
    /// The ledger, ready to use (empty if there was none or it was set aside).
    pub ledger: Ledger,
    /// Set when a corrupt ledger was moved aside: its originals are no longer known to nodetune
    /// and should be reported to the user.
    pub set_aside: Option<SetAside>,
}

/// The baseline ledger of one state directory (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    entries: BTreeMap<SysctlKey, LedgerEntry>,
    _lock: File,
}

impl Ledger {
    /// Opens the ledger in `state_dir` (created with mode 0700 if missing), taking the lock.
    pub fn load(state_dir: impl AsRef<Path>) -> Result<LoadOutcome, LedgerError> {
        let dir = state_dir.as_ref().to_owned();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let lock = lock(&dir)?;
        let path = dir.join(LEDGER_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut ledger = Ledger {
            dir,
            entries: BTreeMap::new(),
            _lock: lock,
        };
        let Some(bytes) = bytes else {
            return Ok(LoadOutcome {
                ledger,
                set_aside: None,
            });
        };
        match parse(&bytes) {
            Ok(entries) => {
                ledger.entries = entries;
                Ok(LoadOutcome {
                    ledger,
                    set_aside: None,
                })
            }
            Err(Parse::Version(found)) => Err(LedgerError::UnsupportedVersion { path, found }),
            Err(Parse::Corrupt(reason)) => {
                let moved_to = ledger.set_aside(&path)?;
                tracing::warn!(
                    ledger = %path.display(),
                    moved_to = %moved_to.display(),
                    %reason,
                    "corrupt ledger moved aside; the originals it held are no longer tracked"
                );
                Ok(LoadOutcome {
                    ledger,
                    set_aside: Some(SetAside { moved_to, reason }),
                })
            }
        }
    }

    /// The ledger file (`<state-dir>/ledger.json`).
    pub fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// All entries, ordered by key.
    pub fn entries(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.entries.values()
    }

    /// The entry for `key`, if nodetune changed it.
    pub fn get(&self, key: &SysctlKey) -> Option<&LedgerEntry> {
        self.entries.get(key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `original` as the value of `key` before nodetune changed it, unless the key is
    /// already recorded; persists before returning. Returns whether it recorded. On error the
    /// ledger is unchanged (in memory and on disk) and the caller must not write the kernel.
    pub fn record_original(
        &mut self,
        key: &SysctlKey,
        original: &str,
        profile: Option<&str>,
    ) -> Result<bool, LedgerError> {
        if self.entries.contains_key(key) {
            return Ok(false);
        }
        let entry = LedgerEntry {
            key: key.clone(),
            original: original.to_owned(),
            scope: key.scope(),
            first_changed_unix: now_unix(),
            profile: profile.map(str::to_owned),
        };
        self.entries.insert(key.clone(), entry);
        if let Err(e) = self.persist() {
            self.entries.remove(key);
            return Err(e);
        }
        Ok(true)
    }

    /// Removes `key` and persists; returns the removed entry (`None` if it was not recorded,
    /// in which case nothing is written). On error the ledger is unchanged.
    pub fn remove(&mut self, key: &SysctlKey) -> Result<Option<LedgerEntry>, LedgerError> {
        let Some(entry) = self.entries.remove(key) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.entries.insert(key.clone(), entry);
            return Err(e);
        }
        Ok(Some(entry))
    }

    /// Writes the ledger atomically: temp file in the state directory, write, fsync, rename over
    /// `ledger.json`, fsync the directory.
    fn persist(&self) -> Result<(), LedgerError> {
        let file = LedgerFile {
            version: FORMAT_VERSION,
            entries: self.entries.values().cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)?;
        bytes.push(b'\n');
        let tmp = self.dir.join(TEMP_FILE);
        let result = write_synced(&tmp, &bytes).and_then(|()| {
            let dest = self.path();
            fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
            sync_dir(&self.dir)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Renames a corrupt ledger to `ledger.json.corrupt-<unix-secs>[-n]`.
    fn set_aside(&self, path: &Path) -> Result<PathBuf, LedgerError> {
        let base = format!("{LEDGER_FILE}.corrupt-{}", now_unix());
        let mut moved_to = self.dir.join(&base);
        let mut n = 1;
        while moved_to.exists() {
            moved_to = self.dir.join(format!("{base}-{n}"));
            n += 1;
        }
        fs::rename(path, &moved_to).map_err(io_err("move aside", path))?;
        sync_dir(&self.dir)?;
        Ok(moved_to)
    }
}

enum Parse {
    Version(u64),
    Corrupt(String),
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<SysctlKey, LedgerEntry>, Parse> {
    // Look at the version first, so a newer format is refused rather than called corrupt.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Parse::Corrupt(format!("not JSON: {e}")))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        Some(found) if found > FORMAT_VERSION => return Err(Parse::Version(found)),
        _ => {
            return Err(Parse::Corrupt(format!(
                "no valid \"version\" field (expected {FORMAT_VERSION})"
            )));
        }
    }
    let file: LedgerFile =
        serde_json::from_value(value).map_err(|e| Parse::Corrupt(e.to_string()))?;
    let mut entries = BTreeMap::new();
    for entry in file.entries {
        let key = entry.key.clone();
        if entries.insert(key.clone(), entry).is_some() {
            return Err(Parse::Corrupt(format!("key {key} appears twice")));
        }
    }
    Ok(entries)
}

fn lock(dir: &Path) -> Result<File, LedgerError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LedgerError::Locked {
                path: dir.to_owned(),
            }
        } else {
            io_err("lock", &path)(err)
        });
    }
    Ok(file)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LedgerError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

fn sync_dir(dir: &Path) -> Result<(), LedgerError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SysctlKey {
        SysctlKey::parse(s).unwrap()
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip_and_first_original_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        {
            let out = Ledger::load(&state).unwrap();
            assert!(out.set_aside.is_none());
            let mut l = out.ledger;
            assert!(l.is_empty());
            let k = key("net/ipv4/ip_local_port_range");
            assert!(l.record_original(&k, "32768\t60999", Some("web")).unwrap());
            // a second change keeps the first original
            assert!(!l.record_original(&k, "1024\t65000", Some("mail")).unwrap());
            assert!(
                l.record_original(&key("kernel.shmmax"), "18446744073709551615", None)
                    .unwrap()
            );
            assert_eq!(l.len(), 2);
        }
        let l = Ledger::load(&state).unwrap().ledger;
        let e = l.get(&key("net.ipv4.ip_local_port_range")).unwrap();
        assert_eq!(e.original, "32768\t60999");
        assert_eq!(e.profile.as_deref(), Some("web"));
        assert_eq!(e.scope, Scope::NetworkNamespace);
        assert!(e.first_changed_unix > 1_600_000_000);
        let shm = l.get(&key("kernel.shmmax")).unwrap();
        assert_eq!(shm.scope, Scope::IpcNamespace);
        assert_eq!(shm.profile, None);
        let keys: Vec<String> = l.entries().map(|e| e.key.to_string()).collect();
        assert_eq!(keys, ["kernel.shmmax", "net.ipv4.ip_local_port_range"]);

        let text = fs::read_to_string(l.path()).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.contains("\"firstChangedUnix\""), "{text}");
        assert!(text.contains("\"net.ipv4.ip_local_port_range\""), "{text}");
    }

    #[test]
    fn remove_persists() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::load(dir.path()).unwrap().ledger;
        let k = key("vm.swappiness");
        l.record_original(&k, "60", None).unwrap();
        assert_eq!(l.remove(&k).unwrap().unwrap().original, "60");
        assert_eq!(l.remove(&k).unwrap(), None);
        drop(l);
        assert!(Ledger::load(dir.path()).unwrap().ledger.is_empty());
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::load(dir.path()).unwrap().ledger;
        for i in 0..5 {
            l.record_original(&key(&format!("net.ipv4.k{i}")), "1", None)
                .unwrap();
        }
        l.remove(&key("net.ipv4.k0")).unwrap();
        assert_eq!(dir_names(dir.path()), [LEDGER_FILE, LOCK_FILE]);
    }

    #[test]
    fn corrupt_ledger_is_moved_aside_and_reported() {
        for garbage in [
            &b"{\"version\": 1, \"entries\": [ {\"key\": "[..],
            b"",
            b"[]",
            b"{\"entries\": []}",
            b"{\"version\": 1, \"entries\": [{\"key\": \"net/../x\", \"original\": \"1\", \"scope\": \"Node\", \"firstChangedUnix\": 1}]}",
            b"{\"version\": 1, \"entries\": [{\"key\": \"vm.a\", \"original\": \"1\", \"scope\": \"Node\", \"firstChangedUnix\": 1}, {\"key\": \"vm/a\", \"original\": \"2\", \"scope\": \"Node\", \"firstChangedUnix\": 1}]}",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(LEDGER_FILE);
            fs::write(&path, garbage).unwrap();
            let out = Ledger::load(dir.path()).unwrap();
            let aside = out.set_aside.expect("reported");
            assert!(out.ledger.is_empty());
            assert!(!path.exists(), "moved, not left in place");
            assert_eq!(fs::read(&aside.moved_to).unwrap(), garbage, "content kept");
            let name = aside.moved_to.file_name().unwrap().to_string_lossy();
            assert!(name.starts_with("ledger.json.corrupt-"), "{name}");
            assert!(!aside.reason.is_empty());
        }
    }

    #[test]
    fn second_corrupt_ledger_in_the_same_second_gets_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut moved = Vec::new();
        for _ in 0..2 {
            fs::write(dir.path().join(LEDGER_FILE), "nope").unwrap();
            let out = Ledger::load(dir.path()).unwrap();
            moved.push(out.set_aside.unwrap().moved_to);
        }
        assert_ne!(moved[0], moved[1]);
        assert!(moved.iter().all(|p| p.exists()));
    }

    #[test]
    fn newer_version_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        fs::write(&path, r#"{"version": 2, "entries": [], "more": true}"#).unwrap();
        let err = Ledger::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, LedgerError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
        assert!(path.exists());
    }

    #[test]
    fn unreadable_ledger_is_an_error_not_corruption() {
        // A directory where the file should be: reading fails with EISDIR (a permission test
        // would not work when the tests run as root).
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(LEDGER_FILE)).unwrap();
        let err = Ledger::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, LedgerError::Io { action: "read", .. }),
            "{err}"
        );
        assert!(dir.path().join(LEDGER_FILE).is_dir());
    }

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::load(dir.path()).unwrap();
        let err = Ledger::load(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::Locked { .. }), "{err}");
        drop(first);
        assert!(Ledger::load(dir.path()).is_ok());
    }

    #[test]
    fn failed_persist_leaves_ledger_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::load(dir.path()).unwrap().ledger;
        // make the temp file path a directory, so creating it fails
        fs::create_dir(dir.path().join(TEMP_FILE)).unwrap();
        let err = l
            .record_original(&key("vm.swappiness"), "60", None)
            .unwrap_err();
        assert!(matches!(err, LedgerError::Io { .. }), "{err}");
        assert!(l.is_empty());
        assert!(!dir.path().join(LEDGER_FILE).exists());
    }
}
