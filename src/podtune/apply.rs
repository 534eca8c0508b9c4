//! The steps of tuning one pod's namespace, pure: from the values read inside it, which keys
//! are already right, which originals to record, and what to write; then, from what the
//! writes did, each key's result. The agent runs the reads and writes inside the namespace
//! (`podnet::inside_each`) and the ledger work between them on its own thread, so the original
//! is persisted before the kernel is written, as on the host.
use std::collections::BTreeMap;

use super::selection::PodPlan;
use crate::api::{KeyState, Mode, Scope};
use crate::sysctl::ledger::PodLedgerEntry;
use crate::sysctl::{KeyResult, Policy, SysctlKey, value};

/// A failed read or write: the state it gives the key and why.
pub type Failure = (KeyState, String);

/// What was read inside a namespace, per canonical key.
pub type Reads = BTreeMap<String, Result<String, Failure>>;

/// One write inside a namespace: a profile's value, or an original put back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub key: SysctlKey,
    pub value: String,
    /// The original recorded for this key in this namespace, if any.
    pub original: Option<String>,
    pub restore: bool,
    pub optional: bool,
}

/// What a [`Set`] did: the value before, the write (skipped when already equal) and the value
/// read back after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetOutcome {
    pub previous: Result<String, Failure>,
    pub write: Option<Result<(), Failure>>,
    pub actual: Option<Result<String, Failure>>,
}

/// The outcome of [`decide`] for one pod.
#[derive(Debug, Default)]
pub struct Decided {
    /// Keys whose result is known without writing (already right, DryRun, unreadable).
    pub done: Vec<KeyResult>,
    /// Originals to record (persisted) before any of `sets` is written.
    pub record: Vec<PodLedgerEntry>,
    pub sets: Vec<Set>,
}

pub(crate) fn result(key: &SysctlKey, desired: &str, state: KeyState) -> KeyResult {
    KeyResult {
        key: key.dotted(),
        desired: Some(desired.to_owned()),
        previous: None,
        actual: None,
        original: None,
        scope: key.scope(),
        optional: false,
        state,
        changed: false,
        message: None,
    }
}

/// Splits one pod's wanted keys by what was read in its namespace (`inode`). `held` gives the
/// original the ledger already holds for a key there.
pub fn decide(
    plan: &PodPlan,
    reads: &Reads,
    inode: u64,
    held: impl Fn(&SysctlKey) -> Option<String>,
) -> Decided {
    let mut out = Decided::default();
    for d in plan.merged.desired.values() {
        let mut r = result(&d.key, &d.value, KeyState::Applied);
        r.optional = d.optional;
        r.original = held(&d.key);
        let current = match reads.get(&d.key.dotted()) {
            Some(Ok(v)) => v.clone(),
            Some(Err((state, why))) => {
                r.state = *state;
                r.message = Some(why.clone());
                out.done.push(r);
                continue;
            }
            None => continue, // not read: the namespace's bound was reached
        };
        let same = value::same(&current, &d.value);
        r.previous = Some(current.clone());
        if d.mode == Mode::DryRun || same {
            if d.mode == Mode::DryRun {
                r.state = KeyState::DryRun;
                r.changed = !same;
                r.message = Some(if same {
                    "already set".into()
                } else {
                    format!("would change {current:?} to {:?}", d.value)
                });
            }
            r.actual = Some(current);
            out.done.push(r);
            continue;
        }
        if r.original.is_none() {
            out.record.push(PodLedgerEntry::new(
                &plan.pod.uid,
                inode,
                d.key.clone(),
                &current,
                Some(&d.profile),
            ));
        }
        out.sets.push(Set {
            key: d.key.clone(),
            value: d.value.clone(),
            original: r.original.clone().or(Some(current)),
            restore: false,
            optional: d.optional,
        });
    }
    out
}

/// A restore of `entry`'s original, or why it must not be written (a ledger entry is input:
/// only a `NetworkNamespace` key the cluster policy allows goes back into a pod).
pub fn restore_set(entry: &PodLedgerEntry, policy: &Policy) -> Result<Set, Box<KeyResult>> {
    let refused = |state: KeyState, why: String| {
        let mut r = result(&entry.key, &entry.original, state);
        r.message = Some(format!(
            "{why}; the ledger entry was not written and is kept"
        ));
        Box::new(r)
    };
    if entry.key.scope() != Scope::NetworkNamespace {
        return Err(refused(
            KeyState::Denied,
            format!("{} is not a network-namespace key", entry.key),
        ));
    }
    if let Err(v) = policy.check(&entry.key, &entry.original) {
        return Err(refused(v.state, v.message));
    }
    Ok(Set {
        key: entry.key.clone(),
        value: entry.original.clone(),
        original: Some(entry.original.clone()),
        restore: true,
        optional: false,
    })
}

/// The key's result from what its [`Set`] did: verified only when the kernel reads back the
/// value written.
pub fn outcome(set: &Set, done: &SetOutcome) -> KeyResult {
    let ok_state = if set.restore {
        KeyState::Restored
    } else {
        KeyState::Applied
    };
    let mut r = result(&set.key, &set.value, ok_state);
    r.optional = set.optional;
    r.original = set.original.clone();
    let fail = |mut r: KeyResult, (state, why): &Failure| {
        r.state = *state;
        r.message = Some(why.clone());
        r
    };
    let previous = match &done.previous {
        Ok(v) => v.clone(),
        Err(f) => return fail(r, f),
    };
    r.previous = Some(previous.clone());
    if let Some(Err(f)) = &done.write {
        return fail(r, f);
    }
    match &done.actual {
        None => r.actual = Some(previous),
        Some(Err(f)) => return fail(r, f),
        Some(Ok(actual)) => {
            r.changed = !value::same(actual, &previous);
            r.actual = Some(actual.clone());
            if !value::same(actual, &set.value) {
                r.state = KeyState::Failed;
                r.message = Some(format!(
                    "wrote {:?} but the kernel reports {actual:?} (it may clamp, round or \
                     reformat this value)",
                    set.value
                ));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests;
