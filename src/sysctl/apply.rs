//! Applying desired values to the kernel, dry runs, and restoring originals from the ledger.
//!
//! Every function here reports per key in a [`KeyResult`] and never stops at a bad key: one
//! unsupported, invalid or denied key does not prevent the others from being applied.
//!
//! Order of operations for a change (crash safety): read the current value → record it in the
//! ledger and persist the ledger → write the kernel → read back and compare. A crash after the
//! ledger write and before the kernel write leaves an entry whose original equals the kernel
//! value; restoring it is a harmless no-op.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::vocab::{KeyState, Scope};

use super::key::SysctlKey;
use super::ledger::Ledger;
use super::policy;
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
            state,
            changed: false,
            message: None,
        }
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

/// Parse, policy and value checks shared by apply and dry run.
fn precheck(raw_key: &str, desired: &str) -> Result<SysctlKey, Box<KeyResult>> {
    let key = SysctlKey::parse(raw_key).map_err(|e| {
        let mut r = KeyResult::new(raw_key.to_owned(), Scope::Node, KeyState::Invalid);
        r.desired = Some(desired.to_owned());
        Box::new(r.fail(KeyState::Invalid, e.to_string()))
    })?;
    let base = || {
        let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Invalid);
        r.desired = Some(desired.to_owned());
        r
    };
    if let Err(v) = policy::check(&key) {
        return Err(Box::new(base().fail(KeyState::Denied, v.to_string())));
    }
    if let Err(e) = value::check(desired) {
        return Err(Box::new(base().fail(KeyState::Invalid, e.to_string())));
    }
    Ok(key)
}

/// Sets `key` to `desired` (see the module docs for the order of operations).
///
/// * already equal after whitespace normalisation → [`KeyState::Applied`], `changed: false`;
/// * written and read back equal → [`KeyState::Applied`], `changed: true`;
/// * malformed key or value, or the kernel says EINVAL → [`KeyState::Invalid`];
/// * on the policy denylist → [`KeyState::Denied`] without touching the kernel; EPERM, EACCES,
///   EROFS → [`KeyState::Denied`];
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
) -> KeyResult {
    let key = match precheck(key, desired) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Applied);
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
        let after = fs.read(&key).ok();
        r.changed = after.as_deref().is_some_and(|a| !value::same(a, &current));
        r.actual = after.clone();
        let mut r = r.io_fail(&key, &e);
        if recorded {
            let note = match after {
                Some(a) if value::same(&a, &current) => match ledger.remove(&key) {
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
                    "; the value could not be read back, so the original stays in the ledger"
                        .to_owned(),
                ),
            };
            if let (Some(note), Some(msg)) = (note, r.message.as_mut()) {
                msg.push_str(&note);
            }
        }
        return r;
    }

    match fs.read(&key) {
        Ok(actual) => {
            r.changed = !value::same(&actual, &current);
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

/// Applies every `(key, value)` in order with [`apply_one`]; one result per input pair. A key
/// given twice (e.g. in both spellings) is applied once; the repeat is reported
/// [`KeyState::Invalid`].
pub fn apply_all<I, K, V>(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    desired: I,
    profile: Option<&str>,
) -> Vec<KeyResult>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut seen = BTreeSet::new();
    desired
        .into_iter()
        .map(|(k, v)| {
            let (k, v) = (k.as_ref(), v.as_ref());
            if let Some(dup) = duplicate(&mut seen, k, v) {
                return dup;
            }
            apply_one(fs, ledger, k, v, profile)
        })
        .collect()
}

fn duplicate(seen: &mut BTreeSet<SysctlKey>, raw: &str, desired: &str) -> Option<KeyResult> {
    let key = SysctlKey::parse(raw).ok()?;
    if seen.insert(key.clone()) {
        return None;
    }
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Invalid);
    r.desired = Some(desired.to_owned());
    Some(r.fail(
        KeyState::Invalid,
        format!("{raw} names the same key as an earlier entry ({key}); only the first is applied"),
    ))
}

/// What [`apply_one`] would do, without writing anything (kernel or ledger).
///
/// Keys that could not be applied are reported with the state applying would give (Invalid,
/// Denied, Unsupported, ...); otherwise [`KeyState::DryRun`] with `actual` = current value and
/// `changed` = whether applying would change it. `ledger`, if given, fills in `original`.
pub fn dry_run_one(fs: &SysctlFs, ledger: Option<&Ledger>, key: &str, desired: &str) -> KeyResult {
    let key = match precheck(key, desired) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::DryRun);
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

/// Puts the original value of `key` back and drops it from the ledger. `None` if the ledger
/// has no entry for `key` (nodetune never changed it; nothing is touched).
///
/// * written and verified, or already equal → [`KeyState::Restored`] (entry removed);
/// * the key no longer exists (e.g. its interface is gone) → [`KeyState::Unsupported`] and the
///   entry is dropped, since there is nothing left to restore;
/// * other errors or a read-back mismatch → their state; the entry stays for a later attempt.
pub fn restore_key(fs: &SysctlFs, ledger: &mut Ledger, key: &SysctlKey) -> Option<KeyResult> {
    let entry = ledger.get(key)?.clone();
    let mut r = KeyResult::new(key.dotted(), key.scope(), KeyState::Restored);
    r.desired = Some(entry.original.clone());
    r.original = Some(entry.original.clone());

    let gone = |r: KeyResult, ledger: &mut Ledger| {
        let mut msg = format!(
            "{}; dropped from the ledger, there is nothing left to restore",
            unsupported_message(key)
        );
        if let Err(e) = ledger.remove(key) {
            msg = format!("{msg} (but the ledger could not be updated: {e})");
        }
        r.fail(KeyState::Unsupported, msg)
    };

    let current = match fs.read(key) {
        Ok(v) => v,
        Err(SysctlIoError::NotFound { .. }) => return Some(gone(r, ledger)),
        Err(e) => return Some(r.io_fail(key, &e)),
    };
    r.previous = Some(current.clone());
    if !value::same(&current, &entry.original) {
        match fs.write(key, &entry.original) {
            Ok(()) => {}
            Err(SysctlIoError::NotFound { .. }) => return Some(gone(r, ledger)),
            Err(e) => {
                r.actual = fs.read(key).ok();
                return Some(r.io_fail(key, &e));
            }
        }
        match fs.read(key) {
            Ok(actual) => {
                r.changed = !value::same(&actual, &current);
                let ok = value::same(&actual, &entry.original);
                r.actual = Some(actual.clone());
                if !ok {
                    return Some(r.fail(
                        KeyState::Failed,
                        format!(
                            "wrote the original {:?} but the kernel reports {actual:?}; kept in \
                             the ledger",
                            entry.original
                        ),
                    ));
                }
            }
            Err(e) => {
                r.changed = true;
                return Some(r.fail(
                    KeyState::Failed,
                    format!(
                        "wrote the original but could not read it back: {e}; kept in the ledger"
                    ),
                ));
            }
        }
    } else {
        r.actual = Some(current);
        r.message = Some("already at the original value".to_owned());
    }
    if let Err(e) = ledger.remove(key) {
        r.message = Some(format!(
            "restored, but the ledger could not be updated ({e}); the next restore will find the \
             value already in place and drop the entry"
        ));
    }
    Some(r)
}

/// [`restore_key`] for every key in the ledger, in key order.
pub fn restore_all(fs: &SysctlFs, ledger: &mut Ledger) -> Vec<KeyResult> {
    let keys: Vec<SysctlKey> = ledger.entries().map(|e| e.key.clone()).collect();
    keys.iter()
        .filter_map(|k| restore_key(fs, ledger, k))
        .collect()
}

#[cfg(test)]
mod tests;
