//! Applying desired values to the kernel, dry runs, and restoring originals from the ledger.
//!
//! Every function here reports per key in a [`KeyResult`] and never stops at a bad key: one
//! unsupported, invalid or denied key does not prevent the others from being applied.
//!
//! Order of operations for a change (crash safety): read the current value → record it in the
//! ledger and persist the ledger → write the kernel → read back and compare. A crash after the
//! ledger write and before the kernel write leaves an entry whose original equals the kernel
//! value; restoring it is a harmless no-op.
//!
//! Every value written, a restored original included, first passes [`Policy::check`]: the
//! ledger is input like a profile, and a forged entry must not reach the kernel.
//!
//! Restoring n keys rewrites the ledger once, after the kernel writes: a crash in between
//! leaves entries whose original is already in place, and the next restore finds them equal.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::vocab::{KeyState, Scope};

use super::key::{self, SysctlKey};
use super::ledger::Ledger;
use super::policy::Policy;
use super::procfs::{SysctlFs, SysctlIoError};
use super::value;

/// The outcome for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyResult {
    /// The key in canonical dotted form, or as given if it could not be parsed.
    pub key: String,
    /// The value asked for (for a restore: the original being put back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// The kernel value before this operation, if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The kernel value after this operation, if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
    /// The value before nodetune first changed the key (from the ledger), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// The key's scope ([`Scope::Node`] if the key could not be parsed).
    pub scope: Scope,
    /// The key was marked optional (`-` prefix): [`KeyState::Unsupported`] is then no failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// The outcome.
    pub state: KeyState,
    /// Whether the kernel value was changed; for [`KeyState::DryRun`], whether applying would
    /// change it.
    pub changed: bool,
    /// Explanation for anything but a plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl KeyResult {
    fn new(key: String, scope: Scope, state: KeyState) -> Self {
        Self {
            key,
            desired: None,
            previous: None,
            actual: None,
            original: None,
            scope,
            optional: false,
            state,
            changed: false,
            message: None,
        }
    }

    /// Whether this outcome counts as a failure (for roll-ups and exit codes): a failing state,
    /// except Unsupported for an optional key.
    pub fn is_failure(&self) -> bool {
        self.state.is_failure() && !(self.optional && self.state == KeyState::Unsupported)
    }

    fn fail(mut self, state: KeyState, message: impl Into<String>) -> Self {
        self.state = state;
        self.message = Some(message.into());
        self
    }

    fn io_fail(self, key: &SysctlKey, err: &SysctlIoError) -> Self {
        let msg = match err {
            SysctlIoError::NotFound { .. } => unsupported_message(key),
            other => other.to_string(),
        };
        self.fail(err.state(), msg)
    }
}

/// The message for a key the running kernel does not have: says that `net.ipv4.tcp_tw_recycle`
/// was removed in Linux 4.12, and hints at a missing interface for per-device keys.
pub fn unsupported_message(key: &SysctlKey) -> String {
    let key = key.dotted();
    let mut msg = format!("the running kernel has no sysctl {key}");
    if key == "net.ipv4.tcp_tw_recycle" {
        msg.push_str(
            ": it was removed in Linux 4.12 because it broke clients behind NAT; drop it from the \
             profile (net.ipv4.tcp_tw_reuse is the supported way to reuse TIME_WAIT sockets for \
             outgoing connections)",
        );
    } else if is_per_device(&key) {
        msg.push_str(" (does the interface exist in this network namespace?)");
    } else {
        msg.push_str(" (removed, renamed, or its module is not loaded)");
    }
    msg
}

fn is_per_device(dotted: &str) -> bool {
    let parts: Vec<&str> = dotted.splitn(4, '.').collect();
    matches!(parts.as_slice(), ["net", _, "conf" | "neigh", rest]
        if !rest.starts_with("all.") && !rest.starts_with("default."))
}

/// Key grammar (with the optional `-` marker) and [`Policy::check`], shared by apply and dry
/// run. Returns the key and whether it is optional.
fn precheck(
    raw_key: &str,
    desired: &str,
    policy: &Policy,
) -> Result<(SysctlKey, bool), Box<KeyResult>> {
    let (key, optional) = key::parse_spec(raw_key).map_err(|e| {
        let mut r = KeyResult::new(raw_key.to_owned(), Scope::Node, KeyState::Invalid);
        r.desired = Some(desired.to_owned());
        Box::new(r.fail(KeyState::Invalid, e.to_string()))
    })?;
    if let Err(refusal) = policy.check(&key, desired) {
        let mut r = KeyResult::new(key.dotted(), key.scope(), refusal.state);
        r.desired = Some(desired.to_owned());
        r.optional = optional;
        return Err(Box::new(r.fail(refusal.state, refusal.message)));
    }
    Ok((key, optional))
}

/// Sets `key` to `desired` (see the module docs for the order of operations).
///
/// * already equal after whitespace normalisation → [`KeyState::Applied`], `changed: false`;
/// * written and read back equal → [`KeyState::Applied`], `changed: true`;
/// * malformed key or value, or the kernel says EINVAL → [`KeyState::Invalid`];
/// * refused by [`Policy::check`] → [`KeyState::Denied`] without touching the kernel; EPERM,
///   EACCES, EROFS → [`KeyState::Denied`];
/// * the kernel has no such key → [`KeyState::Unsupported`];
/// * read back different, ledger not persistable, other I/O errors → [`KeyState::Failed`].
///
/// The original value is recorded in `ledger` (with `profile`) the first time nodetune changes
/// the key. If the write then fails and the kernel value is verifiably unchanged, that fresh
/// entry is removed again.
pub fn apply_one(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    key: &str,
    desired: &str,
    profile: Option<&str>,
    policy: &Policy,
) -> KeyResult {
    let (key, optional) = match precheck(key, desired, policy) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Applied);
    r.optional = optional;
    r.desired = Some(desired.to_owned());
    r.original = ledger.get(&key).map(|e| e.original.clone());

    let current = match fs.read(&key) {
        Ok(v) => v,
        Err(e) => return r.io_fail(&key, &e),
    };
    r.previous = Some(current.clone());
    if value::same(&current, desired) {
        r.actual = Some(current);
        return r;
    }

    let recorded = match ledger.record_original(&key, &current, profile) {
        Ok(recorded) => recorded,
        Err(e) => {
            return r.fail(
                KeyState::Failed,
                format!("kernel not touched: could not record the original value: {e}"),
            );
        }
    };
    if recorded {
        r.original = Some(current.clone());
    }

    if let Err(e) = fs.write(&key, desired) {
        return write_failed(fs, ledger, &key, r, &current, recorded, &e);
    }
    read_back(fs, &key, r, &current, desired)
}

/// The write of `key` failed with `e`: say what the kernel holds now, and drop the ledger
/// entry just `recorded` if the kernel value is verifiably unchanged.
fn write_failed(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    key: &SysctlKey,
    mut r: KeyResult,
    current: &str,
    recorded: bool,
    e: &SysctlIoError,
) -> KeyResult {
    let after = fs.read(key).ok();
    r.changed = after.as_deref().is_some_and(|a| !value::same(a, current));
    r.actual = after.clone();
    let mut r = r.io_fail(key, e);
    if !recorded {
        return r;
    }
    let note = match after {
        Some(a) if value::same(&a, current) => match ledger.remove(key) {
            Ok(_) => {
                r.original = None;
                None
            }
            Err(le) => Some(format!(
                "; the ledger entry just recorded could not be removed again: {le}"
            )),
        },
        Some(_) => Some(
            "; the kernel value changed despite the error, so the original stays in the \
             ledger"
                .to_owned(),
        ),
        None => Some(
            "; the value could not be read back, so the original stays in the ledger".to_owned(),
        ),
    };
    if let (Some(note), Some(msg)) = (note, r.message.as_mut()) {
        msg.push_str(&note);
    }
    r
}

/// After a successful write: the kernel must read back what was written (it may clamp, round
/// or reformat).
fn read_back(
    fs: &SysctlFs,
    key: &SysctlKey,
    mut r: KeyResult,
    current: &str,
    desired: &str,
) -> KeyResult {
    match fs.read(key) {
        Ok(actual) => {
            r.changed = !value::same(&actual, current);
            let ok = value::same(&actual, desired);
            r.actual = Some(actual.clone());
            if ok {
                r
            } else {
                r.fail(
                    KeyState::Failed,
                    format!(
                        "wrote {desired:?} but the kernel reports {actual:?} (it may clamp, round \
                         or reformat this value)"
                    ),
                )
            }
        }
        Err(e) => {
            r.changed = true;
            r.fail(
                KeyState::Failed,
                format!("wrote {desired:?} but could not read it back: {e}"),
            )
        }
    }
}

/// What [`apply_one`] would do, without writing anything (kernel or ledger).
///
/// Keys that could not be applied are reported with the state applying would give (Invalid,
/// Denied, Unsupported, ...); otherwise [`KeyState::DryRun`] with `actual` = current value and
/// `changed` = whether applying would change it. `ledger`, if given, fills in `original`.
pub fn dry_run_one(
    fs: &SysctlFs,
    ledger: Option<&Ledger>,
    key: &str,
    desired: &str,
    policy: &Policy,
) -> KeyResult {
    let (key, optional) = match precheck(key, desired, policy) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::DryRun);
    r.optional = optional;
    r.desired = Some(desired.to_owned());
    r.original = ledger.and_then(|l| l.get(&key)).map(|e| e.original.clone());
    match fs.read(&key) {
        Ok(current) => {
            r.changed = !value::same(&current, desired);
            r.message = Some(if r.changed {
                format!("would change {current:?} to {desired:?}")
            } else {
                "already set".to_owned()
            });
            r.previous = Some(current.clone());
            r.actual = Some(current);
            r
        }
        Err(e) => r.io_fail(&key, &e),
    }
}

/// What to do with a ledger entry after trying to restore it.
enum AfterRestore {
    /// Done (restored, or nothing left to restore): drop the entry.
    Drop,
    /// Keep it for a later attempt.
    Keep,
}

/// Puts the original value of `key` back and drops it from the ledger. `None` if the ledger
/// has no entry for `key` (nodetune never changed it; nothing is touched).
/// See [`restore_keys`].
pub fn restore_key(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    key: &SysctlKey,
    policy: &Policy,
) -> Option<KeyResult> {
    restore_keys(fs, ledger, std::slice::from_ref(key), policy).pop()
}

/// Puts back the original value of each key of `keys` that the ledger holds (others are
/// skipped), then drops the finished entries with **one** ledger rewrite.
///
/// * refused by [`Policy::check`] (a forged or tampered entry, a key the cluster policy now
///   denies, a weakening value without opt-in) → that state, nothing written, entry kept;
/// * written and verified, or already equal → [`KeyState::Restored`] (entry dropped);
/// * the key no longer exists (e.g. its interface is gone) → [`KeyState::Unsupported`] and the
///   entry is dropped, since there is nothing left to restore;
/// * other errors (the kernel refusing the value, ENOENT from a write included) or a read-back
///   mismatch → their state; the entry stays for a later attempt.
pub fn restore_keys(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    keys: &[SysctlKey],
    policy: &Policy,
) -> Vec<KeyResult> {
    let mut results = Vec::new();
    let mut done = Vec::new();
    for key in keys {
        let Some(entry) = ledger.get(key) else {
            continue;
        };
        let (r, after) = restore_in_kernel(fs, key, &entry.original, policy);
        if let AfterRestore::Drop = after {
            done.push(results.len());
        }
        results.push(r);
    }
    let drop_keys: Vec<SysctlKey> = done
        .iter()
        .filter_map(|&i| SysctlKey::parse(&results[i].key).ok())
        .collect();
    if let Err(e) = ledger.remove_many(&drop_keys) {
        for &i in &done {
            let r = &mut results[i];
            let msg = format!(
                "the ledger could not be updated ({e}); the next restore will find the value \
                 already in place and drop the entry"
            );
            r.message = Some(match r.message.take() {
                Some(m) => format!("{m}; {msg}"),
                None => msg,
            });
        }
    }
    results
}

/// The kernel side of one restore; the ledger is not touched.
fn restore_in_kernel(
    fs: &SysctlFs,
    key: &SysctlKey,
    original: &str,
    policy: &Policy,
) -> (KeyResult, AfterRestore) {
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Restored);
    r.desired = Some(original.to_owned());
    r.original = Some(original.to_owned());
    if let Err(refusal) = policy.check(key, original) {
        let msg = format!(
            "{}; the ledger entry was not written and is kept",
            refusal.message
        );
        return (r.fail(refusal.state, msg), AfterRestore::Keep);
    }
    let gone = |r: KeyResult| {
        let msg = format!(
            "{}; dropped from the ledger, there is nothing left to restore",
            unsupported_message(key)
        );
        (r.fail(KeyState::Unsupported, msg), AfterRestore::Drop)
    };

    let current = match fs.read(key) {
        Ok(v) => v,
        Err(SysctlIoError::NotFound { .. }) => return gone(r),
        Err(e) => return (r.io_fail(key, &e), AfterRestore::Keep),
    };
    r.previous = Some(current.clone());
    if value::same(&current, original) {
        r.actual = Some(current);
        r.message = Some("already at the original value".to_owned());
        return (r, AfterRestore::Drop);
    }
    match fs.write(key, original) {
        Ok(()) => {}
        // Only a missing file: a write the kernel refuses with ENOENT (e.g. an unknown
        // congestion control) is Invalid, and the original stays for a later attempt.
        Err(SysctlIoError::NotFound { .. }) => return gone(r),
        Err(e) => {
            r.actual = fs.read(key).ok();
            let mut r = r.io_fail(key, &e);
            if let Some(m) = r.message.as_mut() {
                m.push_str("; kept in the ledger");
            }
            return (r, AfterRestore::Keep);
        }
    }
    restore_read_back(fs, key, r, &current, original)
}

/// After the original was written back: the entry may go only if the kernel reads it back.
fn restore_read_back(
    fs: &SysctlFs,
    key: &SysctlKey,
    mut r: KeyResult,
    current: &str,
    original: &str,
) -> (KeyResult, AfterRestore) {
    let actual = match fs.read(key) {
        Ok(actual) => actual,
        Err(e) => {
            r.changed = true;
            let msg =
                format!("wrote the original but could not read it back: {e}; kept in the ledger");
            return (r.fail(KeyState::Failed, msg), AfterRestore::Keep);
        }
    };
    r.changed = !value::same(&actual, current);
    let ok = value::same(&actual, original);
    r.actual = Some(actual.clone());
    if ok {
        return (r, AfterRestore::Drop);
    }
    let msg = format!(
        "wrote the original {original:?} but the kernel reports {actual:?}; kept in the ledger"
    );
    (r.fail(KeyState::Failed, msg), AfterRestore::Keep)
}

/// [`restore_keys`] for every key in the ledger, in key order.
pub fn restore_all(fs: &SysctlFs, ledger: &mut Ledger, policy: &Policy) -> Vec<KeyResult> {
    let keys: Vec<SysctlKey> = ledger.entries().map(|e| e.key.clone()).collect();
    restore_keys(fs, ledger, &keys, policy)
}

#[cfg(test)]
mod tests;
