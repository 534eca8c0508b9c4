//! The baseline ledger: the original value of every key nodetune changed, so it can be put back.
//!
//! Stored as `<state-dir>/ledger.json`:
//!
//! ```json
//! {
//!   "version": 1,
//!   "bootId": "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10",
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
//! * The ledger is input like any other: whoever can write it chooses what a restore writes to
//!   the kernel. So the state directory must be a real directory (not a symlink) owned by this
//!   process's user and not writable by others nor a group but root, and so must every
//!   directory on the way to it (root's or this user's, sticky if others may write it), checked
//!   by a walk from `/` that keeps the directory open ([`StateDir`],
//!   [`LedgerError::UnsafeStateDir`]); every file is opened, created and renamed relative to
//!   that descriptor, so swapping the directory after the check changes nothing; the ledger,
//!   its temp file and the lock file are opened with `O_NOFOLLOW` (the temp file also with
//!   `O_EXCL`), so a planted symlink can never redirect a write; and every entry passes the
//!   same checks as a profile's key and value before a restore writes it (see `apply`).
//! * Reading is bounded: a ledger that is not a regular file (FIFO, device) or larger than
//!   [`MAX_LEDGER_BYTES`] is never read, but moved aside as corrupt.
//! * A ledger that cannot be parsed at all is moved aside to `ledger.json.corrupt-<unix-secs>`
//!   and reported in [`LoadOutcome::set_aside`]; it is never silently overwritten. When only
//!   some entries are bad, the file is *copied* there and the good entries stay in use. A ledger
//!   that cannot be *read* (permissions, I/O) or that a newer nodetune wrote is an error, and the
//!   file is left alone.
//! * `bootId` is the boot (`/proc/sys/kernel/random/boot_id`) whose values the originals are;
//!   after a reboot they are re-read and replaced together with the boot id in one atomic
//!   rewrite ([`Ledger::rebase_for_boot`], used by [`super::boot`]). It is optional (a ledger
//!   of an older nodetune has none); a malformed one is ledger damage: the file is copied
//!   aside, the entries are kept and the boot counts as unknown.
//! * `persisted` lists the keys nodetune wrote to its own sysctl.d file on the host (profiles
//!   with `persist: true`): while it is not empty the file may exist, and a restore must remove
//!   it ([`Ledger::set_persisted`] is written before the file grows and after it shrinks). These
//!   keys' boot values are nodetune's own, so a reboot does not rebase them. Optional (older
//!   ledgers have none); a bad key in it is damage like a bad entry.
//! * One process at a time: a [`Ledger`] holds an exclusive lock on `<state-dir>/ledger.lock`
//!   while it lives; a second [`Ledger::load`] on the same directory fails with
//!   [`LedgerError::Locked`] (e.g. `restore --local` while the agent runs).
//! * Originals changed inside pods' network namespaces are kept apart, in `podEntries`, one per
//!   pod namespace (pod uid + namespace inode) and key; see [`pods`]. Left out of the file when
//!   there are none, so a ledger without them reads as before.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::key::SysctlKey;
use super::state_dir::StateDir;
use super::vocab::Scope;

pub mod pods;
pub use pods::{PodLedgerEntry, PodNsKey};

/// Default state directory of the node agent and the local commands.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodetune";
/// File name of the ledger inside the state directory.
pub const LEDGER_FILE: &str = "ledger.json";
/// File name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "ledger.lock";
/// The ledger format this code reads and writes.
pub const FORMAT_VERSION: u64 = 1;
/// Largest ledger read. An entry takes about 200 bytes, so this is over 100,000 keys, far more
/// than a kernel has; anything bigger is not a ledger nodetune wrote.
pub const MAX_LEDGER_BYTES: u64 = 32 << 20;

const TEMP_FILE: &str = ".ledger.json.tmp";

/// One key nodetune changed, with the value it had before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LedgerFile<'a> {
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id: Option<&'a str>,
    entries: Vec<&'a LedgerEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pod_entries: Vec<&'a PodLedgerEntry>,
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    persisted: &'a BTreeSet<SysctlKey>,
}

/// The top level of a ledger as read: entries are parsed one by one, so one bad entry does not
/// cost the others.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedgerFile {
    #[allow(dead_code)] // checked before, from the untyped value
    version: u64,
    /// Checked by hand (see [`valid_boot_id`]), so a bad one costs no entry.
    #[serde(default, rename = "bootId")]
    boot_id: Option<serde_json::Value>,
    entries: Vec<serde_json::Value>,
    /// Parsed one by one too (see [`pods`]).
    #[serde(default, rename = "podEntries")]
    pod_entries: Vec<serde_json::Value>,
    /// Parsed one by one, like the entries.
    #[serde(default)]
    persisted: Vec<serde_json::Value>,
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
    /// The state directory or a file in it could be changed by someone else, or redirect writes.
    #[error("refusing to use {}: {reason}", path.display())]
    UnsafeStateDir {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
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
    /// The ledger holds as many pod entries as it may ([`pods::MAX_POD_ENTRIES`]).
    #[error("the ledger already holds {max} pod entries; nothing more is changed in pods")]
    PodEntriesFull {
        /// The bound.
        max: usize,
    },
    /// Serialising the ledger failed (should not happen).
    #[error("could not encode the ledger: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_err(action: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> LedgerError {
    move |source| LedgerError::Io {
        action,
        path,
        source,
    }
}

/// A corrupt ledger (or the corrupt part of one) that [`Ledger::load`] put out of the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    /// Where the corrupt file now is (moved there, or copied when some entries were usable).
    pub moved_to: PathBuf,
    /// Why it could not be used (fully).
    pub reason: String,
    /// How many entries of it are still in use (0 when the whole file was unusable).
    pub kept: usize,
    /// How many entries were dropped.
    pub dropped: usize,
}

/// What [`Ledger::load`] found.
#[derive(Debug)]
pub struct LoadOutcome {
    /// The ledger, ready to use (empty if there was none or it was set aside).
    pub ledger: Ledger,
    /// Set when a corrupt ledger was moved aside (or copied aside because some entries were bad):
    /// the originals it held are no longer known to nodetune and should be reported to the user.
    pub set_aside: Option<SetAside>,
}

/// The baseline ledger of one state directory (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    dir: StateDir,
    entries: BTreeMap<SysctlKey, LedgerEntry>,
    /// The boot the originals belong to, if known.
    boot_id: Option<String>,
    /// Originals changed inside pods' network namespaces.
    pods: BTreeMap<PodNsKey, PodLedgerEntry>,
    /// Keys in nodetune's sysctl.d file on the host (see the module docs).
    persisted: BTreeSet<SysctlKey>,
    /// How many times the file was rewritten (tests check that a batch is one rewrite).
    rewrites: std::cell::Cell<u64>,
    _lock: File,
}

impl Ledger {
    /// Opens the ledger in `state_dir` (created with mode 0700 if missing), taking the lock.
    /// Refuses a state directory that is a symlink, owned by another user, or writable by group
    /// or others, or that others could swap (see [`StateDir::open`]).
    pub fn load(state_dir: impl AsRef<Path>) -> Result<LoadOutcome, LedgerError> {
        Self::load_in(StateDir::open(state_dir)?)
    }

    /// Opens the ledger in a state directory already walked and held open: whatever is at its
    /// path by now, the ledger read is the one in `dir`.
    pub fn load_in(dir: StateDir) -> Result<LoadOutcome, LedgerError> {
        dir.recheck()?;
        let lock = lock(&dir)?;
        let path = dir.join(LEDGER_FILE);
        let bytes = read_bounded(&dir, LEDGER_FILE)?;
        let ledger = Ledger {
            dir,
            entries: BTreeMap::new(),
            boot_id: None,
            pods: BTreeMap::new(),
            persisted: BTreeSet::new(),
            rewrites: std::cell::Cell::new(0),
            _lock: lock,
        };
        let bytes = match bytes {
            ReadOutcome::Missing => {
                return Ok(LoadOutcome {
                    ledger,
                    set_aside: None,
                });
            }
            ReadOutcome::Unusable(reason) => return ledger.set_aside_corrupt(&path, reason),
            ReadOutcome::Bytes(b) => b,
        };
        match parse(&bytes) {
            Ok(parsed) if parsed.dropped.is_empty() => Ok(LoadOutcome {
                ledger: ledger.adopt(parsed),
                set_aside: None,
            }),
            Ok(parsed) => ledger.keep_good_entries(&path, &bytes, parsed),
            Err(Parse::Version(found)) => Err(LedgerError::UnsupportedVersion { path, found }),
            Err(Parse::Corrupt(reason)) => ledger.set_aside_corrupt(&path, reason),
        }
    }

    /// Takes over what a parse found (the dropped entries are the caller's business).
    fn adopt(mut self, parsed: Parsed) -> Ledger {
        self.entries = parsed.entries;
        self.boot_id = parsed.boot_id;
        self.pods = parsed.pods;
        self.persisted = parsed.persisted;
        self
    }

    /// Some entries were bad: keeps a copy of the whole file for a person to look at, then goes
    /// on with the good entries (rewritten without the bad ones).
    fn keep_good_entries(
        self,
        path: &Path,
        bytes: &[u8],
        parsed: Parsed,
    ) -> Result<LoadOutcome, LedgerError> {
        let moved_to = self.copy_aside(bytes)?;
        let bad_entries = parsed
            .dropped
            .iter()
            .filter(|d| d.starts_with("entry "))
            .count();
        let reason = format!(
            "{} unusable entr{}: {}",
            bad_entries,
            if bad_entries == 1 { "y" } else { "ies" },
            parsed.dropped.join("; ")
        );
        let ledger = self.adopt(parsed);
        ledger.persist()?;
        tracing::warn!(
            ledger = %path.display(),
            copied_to = %moved_to.display(),
            %reason,
            "ledger entries dropped; the good ones are kept"
        );
        Ok(LoadOutcome {
            set_aside: Some(SetAside {
                moved_to,
                reason,
                kept: ledger.entries.len(),
                dropped: bad_entries,
            }),
            ledger,
        })
    }

    /// The file is unusable as a whole: moves it aside and starts empty.
    fn set_aside_corrupt(self, path: &Path, reason: String) -> Result<LoadOutcome, LedgerError> {
        let moved_to = self.move_aside()?;
        tracing::warn!(
            ledger = %path.display(),
            moved_to = %moved_to.display(),
            %reason,
            "corrupt ledger moved aside; the originals it held are no longer tracked"
        );
        Ok(LoadOutcome {
            ledger: self,
            set_aside: Some(SetAside {
                moved_to,
                reason,
                kept: 0,
                dropped: 0,
            }),
        })
    }

    /// The ledger file (`<state-dir>/ledger.json`).
    pub fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A copy of a damaged ledger (`ledger.json.corrupt-*`) in the state directory, if any
    /// (the first by name), looked for in the directory this ledger holds open.
    pub fn set_aside_copy(&self) -> Option<PathBuf> {
        let prefix = format!("{LEDGER_FILE}.corrupt-");
        let mut found: Vec<String> = self.dir.names().ok()?;
        found.retain(|n| n.starts_with(&prefix));
        found.sort();
        found.first().map(|n| self.dir.join(n))
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

    /// The boot (`/proc/sys/kernel/random/boot_id`) the originals were read in, if known.
    pub fn boot_id(&self) -> Option<&str> {
        self.boot_id.as_deref()
    }

    /// Makes the ledger belong to boot `boot_id`, with `originals` (key → value read in that
    /// boot before any write) replacing the originals of those keys: one atomic rewrite, so
    /// a crash leaves either the old boot's ledger (and the next start rebases again from the
    /// still untouched kernel) or the new one, never a mix. Keys not in the ledger are ignored.
    /// On error the ledger is unchanged.
    pub fn rebase_for_boot(
        &mut self,
        boot_id: &str,
        originals: &BTreeMap<SysctlKey, String>,
    ) -> Result<(), LedgerError> {
        let before = (self.boot_id.clone(), self.entries.clone());
        self.boot_id = Some(boot_id.to_owned());
        for (key, value) in originals {
            if let Some(e) = self.entries.get_mut(key) {
                e.original = value.clone();
            }
        }
        if let Err(e) = self.persist() {
            (self.boot_id, self.entries) = before;
            return Err(e);
        }
        Ok(())
    }

    /// Keys nodetune wrote to its sysctl.d file on the host (see the module docs).
    pub fn persisted(&self) -> &BTreeSet<SysctlKey> {
        &self.persisted
    }

    /// Records the keys of nodetune's sysctl.d file; persists only when they changed. On error
    /// the ledger is unchanged and the caller must not write the file.
    pub fn set_persisted(&mut self, keys: BTreeSet<SysctlKey>) -> Result<(), LedgerError> {
        if keys == self.persisted {
            return Ok(());
        }
        let before = std::mem::replace(&mut self.persisted, keys);
        if let Err(e) = self.persist() {
            self.persisted = before;
            return Err(e);
        }
        Ok(())
    }

    /// How many times this ledger rewrote its file since it was loaded.
    pub fn rewrites(&self) -> u64 {
        self.rewrites.get()
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
        Ok(self.remove_many(std::slice::from_ref(key))?.pop())
    }

    /// Removes every key of `keys` that is recorded and persists **once** (so restoring n keys
    /// costs one rewrite, not n). Returns the removed entries. On error the ledger is unchanged.
    pub fn remove_many(&mut self, keys: &[SysctlKey]) -> Result<Vec<LedgerEntry>, LedgerError> {
        let removed: Vec<LedgerEntry> =
            keys.iter().filter_map(|k| self.entries.remove(k)).collect();
        if removed.is_empty() {
            return Ok(removed);
        }
        if let Err(e) = self.persist() {
            for entry in removed {
                self.entries.insert(entry.key.clone(), entry);
            }
            return Err(e);
        }
        Ok(removed)
    }

    /// Writes the ledger atomically: temp file in the state directory, write, fsync, rename over
    /// `ledger.json`, fsync the directory.
    fn persist(&self) -> Result<(), LedgerError> {
        let file = LedgerFile {
            version: FORMAT_VERSION,
            boot_id: self.boot_id.as_deref(),
            entries: self.entries.values().collect(),
            pod_entries: self.pods.values().collect(),
            persisted: &self.persisted,
        };
        let mut bytes = serde_json::to_vec_pretty(&file)?;
        bytes.push(b'\n');
        let result = write_new_synced(&self.dir, TEMP_FILE, &bytes).and_then(|()| {
            self.dir
                .rename(TEMP_FILE, LEDGER_FILE)
                .map_err(io_err("rename", self.path()))?;
            sync_dir(&self.dir)
        });
        match &result {
            Ok(()) => self.rewrites.set(self.rewrites.get() + 1),
            Err(_) => {
                let _ = self.dir.remove(TEMP_FILE);
            }
        }
        result
    }

    /// A free name `ledger.json.corrupt-<unix-secs>[-n]` in the state directory.
    fn aside_name(&self) -> String {
        let base = format!("{LEDGER_FILE}.corrupt-{}", now_unix());
        let mut candidate = base.clone();
        let mut n = 1;
        while self.dir.contains(&candidate) {
            candidate = format!("{base}-{n}");
            n += 1;
        }
        candidate
    }

    /// Renames a corrupt ledger out of the way (the rename never reads it, whatever it is).
    fn move_aside(&self) -> Result<PathBuf, LedgerError> {
        let name = self.aside_name();
        self.dir
            .rename(LEDGER_FILE, &name)
            .map_err(io_err("move aside", self.path()))?;
        sync_dir(&self.dir)?;
        Ok(self.dir.join(&name))
    }

    /// Writes `bytes` (the ledger as read) to a new corrupt-file name.
    fn copy_aside(&self, bytes: &[u8]) -> Result<PathBuf, LedgerError> {
        let name = self.aside_name();
        write_new_synced(&self.dir, &name, bytes)?;
        sync_dir(&self.dir)?;
        Ok(self.dir.join(&name))
    }
}

fn lock(dir: &StateDir) -> Result<File, LedgerError> {
    let path = dir.join(LOCK_FILE);
    let file = dir
        .open_or_create(LOCK_FILE)
        .map_err(|e| refuse_link(&path, "open", e))?;
    let meta = file.metadata().map_err(io_err("inspect", path.clone()))?;
    if !meta.is_file() {
        return Err(LedgerError::UnsafeStateDir {
            path,
            reason: "the lock file is not a regular file".into(),
        });
    }
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LedgerError::Locked {
            path: dir.path().to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(io_err("lock", path)(e)),
    }
}

/// `O_NOFOLLOW` on the last component fails with ELOOP: say so plainly.
fn refuse_link(path: &Path, action: &'static str, e: io::Error) -> LedgerError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        LedgerError::UnsafeStateDir {
            path: path.to_owned(),
            reason: "it is a symlink".into(),
        }
    } else {
        io_err(action, path.to_owned())(e)
    }
}

enum ReadOutcome {
    Missing,
    /// Not read at all: not a regular file, or too large.
    Unusable(String),
    Bytes(Vec<u8>),
}

/// Reads the ledger without following a symlink, without blocking on a FIFO and without reading
/// more than [`MAX_LEDGER_BYTES`].
fn read_bounded(dir: &StateDir, name: &str) -> Result<ReadOutcome, LedgerError> {
    let path = &dir.join(name);
    let file = match dir.open_read(name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReadOutcome::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(ReadOutcome::Unusable(
                "it is a symlink, which nodetune never writes".into(),
            ));
        }
        Err(e) => return Err(io_err("read", path.clone())(e)),
    };
    let meta = file.metadata().map_err(io_err("read", path.clone()))?;
    if meta.is_dir() {
        // Not something a crash or an attacker makes by writing a file: leave it to a person.
        return Err(io_err("read", path.clone())(io::Error::from_raw_os_error(
            libc::EISDIR,
        )));
    }
    if !meta.is_file() {
        return Ok(ReadOutcome::Unusable(
            "it is not a regular file (a FIFO, socket or device)".into(),
        ));
    }
    if meta.len() > MAX_LEDGER_BYTES {
        return Ok(ReadOutcome::Unusable(format!(
            "it is {} bytes, more than the {MAX_LEDGER_BYTES} a ledger can reach",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_LEDGER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path.clone()))?;
    if bytes.len() as u64 > MAX_LEDGER_BYTES {
        return Ok(ReadOutcome::Unusable(format!(
            "it grew beyond {MAX_LEDGER_BYTES} bytes while being read"
        )));
    }
    Ok(ReadOutcome::Bytes(bytes))
}

/// Parses ledger bytes the way [`Ledger::load`] does, without a state directory: the usable
/// entries and why each other entry was dropped, or why the whole file is unusable. For tools
/// and fuzzing; never panics.
pub fn parse_entries(bytes: &[u8]) -> Result<(Vec<LedgerEntry>, Vec<String>), String> {
    match parse(bytes) {
        Ok(p) => Ok((p.entries.into_values().collect(), p.dropped)),
        Err(Parse::Version(v)) => Err(format!("format version {v} is newer than this nodetune")),
        Err(Parse::Corrupt(reason)) => Err(reason),
    }
}

enum Parse {
    Version(u64),
    Corrupt(String),
}

struct Parsed {
    entries: BTreeMap<SysctlKey, LedgerEntry>,
    /// Why each dropped entry was dropped (and why a bad boot id was).
    dropped: Vec<String>,
    boot_id: Option<String>,
    pods: BTreeMap<PodNsKey, PodLedgerEntry>,
    persisted: BTreeSet<SysctlKey>,
}

/// A boot id as the kernel prints it: a lowercase UUID (8-4-4-4-12 hex digits).
pub fn valid_boot_id(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// Parses a ledger: a broken top level is [`Parse::Corrupt`]; a broken entry is dropped and
/// named, and the others are kept.
fn parse(bytes: &[u8]) -> Result<Parsed, Parse> {
    // Look at the version first, so a newer format is refused rather than called corrupt.
    // (serde_json bounds nesting at 128 levels, so hostile nesting fails fast.)
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
    let file: RawLedgerFile =
        serde_json::from_value(value).map_err(|e| Parse::Corrupt(e.to_string()))?;
    let mut entries = BTreeMap::new();
    let mut dropped = Vec::new();
    let boot_id = match file.boot_id {
        None => None,
        Some(serde_json::Value::String(b)) if valid_boot_id(&b) => Some(b),
        Some(other) => {
            let shown: String = other.to_string().chars().take(60).collect();
            dropped.push(format!(
                "bootId {shown} is not a boot id; the boot the originals belong to is unknown"
            ));
            None
        }
    };
    for (i, raw) in file.entries.into_iter().enumerate() {
        match serde_json::from_value::<LedgerEntry>(raw) {
            Ok(entry) => match entries.entry(entry.key.clone()) {
                std::collections::btree_map::Entry::Occupied(_) => dropped.push(format!(
                    "entry {i}: key {} appears twice (the first is kept)",
                    entry.key
                )),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(entry);
                }
            },
            Err(e) => dropped.push(format!("entry {i}: {e}")),
        }
    }
    let pods = pods::parse_pod_entries(file.pod_entries, &mut dropped);
    let mut persisted = BTreeSet::new();
    for (i, raw) in file.persisted.into_iter().enumerate() {
        match serde_json::from_value::<SysctlKey>(raw) {
            Ok(key) => {
                persisted.insert(key);
            }
            Err(e) => dropped.push(format!("persisted {i}: {e}")),
        }
    }
    Ok(Parsed {
        entries,
        dropped,
        boot_id,
        pods,
        persisted,
    })
}

/// Creates `name` in `dir` afresh (removing a leftover first: a stale temp file from a crash,
/// or anything planted there) with `O_EXCL | O_NOFOLLOW`, so the write can never follow a
/// link, then writes and fsyncs.
fn write_new_synced(dir: &StateDir, name: &str, bytes: &[u8]) -> Result<(), LedgerError> {
    let path = dir.join(name);
    match dir.remove(name) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", path)(e)),
    }
    let mut f = dir
        .create_new(name)
        .map_err(io_err("create", path.clone()))?;
    f.write_all(bytes).map_err(io_err("write", path.clone()))?;
    f.sync_all().map_err(io_err("fsync", path))
}

fn sync_dir(dir: &StateDir) -> Result<(), LedgerError> {
    dir.sync().map_err(io_err("fsync", dir.path().to_owned()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::state_dir::effective_uid;
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

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
            b"{\"version\": 1, \"entries\": {}}",
            b"{\"version\": 1, \"entries\": [], \"extra\": 1}",
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
            assert_eq!((aside.kept, aside.dropped), (0, 0));
        }
    }

    /// Defect 4: one bad entry must not cost the good ones. The whole file is copied aside for
    /// a person, the good entries stay in use and the ledger is rewritten without the bad ones.
    #[test]
    fn bad_entries_are_dropped_and_the_good_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let text = r#"{"version": 1, "entries": [
            {"key": "net.ipv4.tcp_fin_timeout", "original": "60", "scope": "NetworkNamespace", "firstChangedUnix": 1},
            {"key": "net/../x", "original": "1", "scope": "Node", "firstChangedUnix": 1},
            {"key": "vm.a", "original": "1", "scope": "Node", "firstChangedUnix": 1},
            {"key": "vm/a", "original": "2", "scope": "Node", "firstChangedUnix": 1},
            {"key": "vm.b", "original": "1", "scope": "Node", "firstChangedUnix": 1, "evil": true},
            {"key": "vm.c", "original": 7, "scope": "Node", "firstChangedUnix": 1}
        ]}"#;
        fs::write(&path, text).unwrap();
        let out = Ledger::load(dir.path()).unwrap();
        let aside = out.set_aside.expect("reported");
        assert_eq!((aside.kept, aside.dropped), (2, 4), "{}", aside.reason);
        for needle in [
            "entry 1",
            "entry 3",
            "appears twice",
            "entry 4",
            "evil",
            "entry 5",
        ] {
            assert!(aside.reason.contains(needle), "{needle}: {}", aside.reason);
        }
        assert_eq!(fs::read_to_string(&aside.moved_to).unwrap(), text);
        let l = out.ledger;
        assert_eq!(l.get(&key("vm.a")).unwrap().original, "1", "first kept");
        assert!(l.get(&key("net.ipv4.tcp_fin_timeout")).is_some());
        drop(l);
        let again = Ledger::load(dir.path()).unwrap();
        assert!(
            again.set_aside.is_none(),
            "rewritten without the bad entries"
        );
        assert_eq!(again.ledger.len(), 2);
    }

    /// Defect 7: a FIFO, an oversized file or a symlink (e.g. to /dev/zero) is never read: it is
    /// set aside at once instead of hanging or eating memory.
    #[test]
    fn non_regular_or_huge_ledger_is_set_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let out = Ledger::load(dir.path()).unwrap();
        let aside = out.set_aside.as_ref().expect("fifo set aside");
        assert!(
            aside.reason.contains("not a regular file"),
            "{}",
            aside.reason
        );
        drop(out);

        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let out = Ledger::load(dir.path()).unwrap();
        assert!(
            out.set_aside
                .as_ref()
                .expect("symlink")
                .reason
                .contains("symlink")
        );
        drop(out);

        let f = File::create(&path).unwrap();
        f.set_len(MAX_LEDGER_BYTES + 1).unwrap(); // sparse: costs no disk
        drop(f);
        let out = Ledger::load(dir.path()).unwrap();
        assert!(out.set_aside.expect("huge").reason.contains("bytes"));
    }

    /// Defect 2: a state directory someone else could write or redirect is refused.
    #[test]
    fn unsafe_state_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = Ledger::load(&link).unwrap_err();
        assert!(matches!(err, LedgerError::UnsafeStateDir { .. }), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");

        fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Ledger::load(&real).unwrap_err();
        assert!(err.to_string().contains("or others (mode 0777)"), "{err}");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(Ledger::load(&real).is_ok());

        if effective_uid() == 0 {
            std::os::unix::fs::chown(&real, None, Some(12345)).unwrap();
            fs::set_permissions(&real, fs::Permissions::from_mode(0o770)).unwrap();
            let err = Ledger::load(&real).unwrap_err();
            assert!(err.to_string().contains("group 12345"), "{err}");
            std::os::unix::fs::chown(&real, None, Some(0)).unwrap();
            fs::set_permissions(&real, fs::Permissions::from_mode(0o775)).unwrap();
            assert!(Ledger::load(&real).is_ok(), "group root may write");
            std::os::unix::fs::chown(&real, Some(12345), None).unwrap();
            let err = Ledger::load(&real).unwrap_err();
            assert!(err.to_string().contains("owned by uid 12345"), "{err}");
        }
    }

    /// Defect 2: symlinks planted at the temp or lock file path are never followed.
    #[test]
    fn planted_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();

        std::os::unix::fs::symlink(&victim, state.join(LOCK_FILE)).unwrap();
        let err = Ledger::load(&state).unwrap_err();
        assert!(matches!(err, LedgerError::UnsafeStateDir { .. }), "{err}");
        fs::remove_file(state.join(LOCK_FILE)).unwrap();

        let mut l = Ledger::load(&state).unwrap().ledger;
        std::os::unix::fs::symlink(&victim, state.join(TEMP_FILE)).unwrap();
        l.record_original(&key("net.ipv4.tcp_fin_timeout"), "60", None)
            .unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(
            !fs::symlink_metadata(state.join(LEDGER_FILE))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let mode = fs::metadata(state.join(LEDGER_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "ledger readable by its owner only");
    }

    #[test]
    fn remove_many_removes_what_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::load(dir.path()).unwrap().ledger;
        for i in 0..4 {
            l.record_original(&key(&format!("net.ipv4.k{i}")), "1", None)
                .unwrap();
        }
        let gone = l
            .remove_many(&[key("net.ipv4.k0"), key("net.ipv4.k2"), key("net.ipv4.zz")])
            .unwrap();
        assert_eq!(gone.len(), 2);
        drop(l);
        let l = Ledger::load(dir.path()).unwrap().ledger;
        let keys: Vec<String> = l.entries().map(|e| e.key.to_string()).collect();
        assert_eq!(keys, ["net.ipv4.k1", "net.ipv4.k3"]);
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
