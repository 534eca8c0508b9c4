//! Originals changed inside pods' network namespaces: the ledger's `podEntries`.
//!
//! ```json
//! "podEntries": [
//!   { "podUid": "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10", "netnsInode": 4026532890,
//!     "key": "net.ipv4.tcp_fin_timeout", "original": "60", "firstChangedUnix": 1764042000,
//!     "profile": "squid" }
//! ]
//! ```
//!
//! One entry per pod namespace (pod uid + the namespace's inode) and key: a pod whose sandbox is
//! recreated gets a new namespace starting from the kernel's defaults, so the old namespace's
//! originals describe nothing that exists and are dropped, never written into the new one.
//! Same rules as host entries: recorded and persisted before the kernel is written, first
//! original only, one rewrite per batch. An entry is input like any other: only a
//! `NetworkNamespace` key and a pod uid that looks like one are loaded (others are dropped and
//! named like a bad host entry), since restoring a node-wide key "inside a pod" would write the
//! host's value.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Ledger, LedgerError, SysctlKey, now_unix};
use crate::sysctl::vocab::Scope;

/// Most pod entries held: about 250 bytes each keeps the file far below
/// [`super::MAX_LEDGER_BYTES`]. 256 namespaces with 64 keys each is 16,384.
pub const MAX_POD_ENTRIES: usize = 50_000;

/// Names one pod entry: pod uid, namespace inode, key.
pub type PodNsKey = (String, u64, SysctlKey);

/// One key nodetune changed inside one pod's network namespace, with the value it had before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodLedgerEntry {
    /// The pod's uid as the API server gives it.
    pub pod_uid: String,
    /// Inode of the pod's network namespace (`stat -L /proc/PID/ns/net`).
    pub netns_inode: u64,
    pub key: SysctlKey,
    /// The value inside the namespace before nodetune first changed it, as the kernel printed it.
    pub original: String,
    pub first_changed_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

impl PodLedgerEntry {
    /// A new entry, stamped now.
    pub fn new(
        pod_uid: &str,
        netns_inode: u64,
        key: SysctlKey,
        original: &str,
        profile: Option<&str>,
    ) -> Self {
        Self {
            pod_uid: pod_uid.to_owned(),
            netns_inode,
            key,
            original: original.to_owned(),
            first_changed_unix: now_unix(),
            profile: profile.map(str::to_owned),
        }
    }

    pub fn id(&self) -> PodNsKey {
        (self.pod_uid.clone(), self.netns_inode, self.key.clone())
    }
}

/// Why a parsed entry may not be used, if it may not.
fn unusable(e: &PodLedgerEntry) -> Option<String> {
    if crate::podnet::PodUid::parse(&e.pod_uid).is_none() {
        return Some(format!("pod uid {:?} is not a uid", short(&e.pod_uid)));
    }
    let scope = e.key.scope();
    (scope != Scope::NetworkNamespace).then(|| {
        format!(
            "key {} has scope {}, and only NetworkNamespace keys are ever set in a pod",
            e.key,
            scope.as_str()
        )
    })
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

/// The usable pod entries of a ledger file; each bad one is named in `dropped`.
pub(super) fn parse_pod_entries(
    raw: Vec<serde_json::Value>,
    dropped: &mut Vec<String>,
) -> BTreeMap<PodNsKey, PodLedgerEntry> {
    let mut out = BTreeMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let entry = match serde_json::from_value::<PodLedgerEntry>(raw) {
            Ok(e) => e,
            Err(e) => {
                dropped.push(format!("entry podEntries[{i}]: {e}"));
                continue;
            }
        };
        if let Some(why) = unusable(&entry) {
            dropped.push(format!("entry podEntries[{i}]: {why}"));
            continue;
        }
        if out.len() >= MAX_POD_ENTRIES {
            dropped.push(format!(
                "entry podEntries[{i}]: more than {MAX_POD_ENTRIES}"
            ));
            continue;
        }
        if out.insert(entry.id(), entry).is_some() {
            dropped.push(format!(
                "entry podEntries[{i}]: appears twice (the last is kept)"
            ));
        }
    }
    out
}

impl Ledger {
    /// Every pod entry, ordered by pod uid, inode and key.
    pub fn pod_entries(&self) -> impl Iterator<Item = &PodLedgerEntry> {
        self.pods.values()
    }

    /// The entry of `key` in one pod namespace, if nodetune changed it there.
    pub fn pod_entry(&self, uid: &str, inode: u64, key: &SysctlKey) -> Option<&PodLedgerEntry> {
        self.pods.get(&(uid.to_owned(), inode, key.clone()))
    }

    /// Records each entry whose (pod, namespace, key) is not recorded yet, then persists
    /// **once**; returns how many were new. Callers write the kernel only after this returned
    /// `Ok`. On error (or beyond [`MAX_POD_ENTRIES`]) nothing is recorded.
    pub fn record_pod_originals(
        &mut self,
        entries: Vec<PodLedgerEntry>,
    ) -> Result<usize, LedgerError> {
        let fresh: Vec<PodLedgerEntry> = entries
            .into_iter()
            .filter(|e| !self.pods.contains_key(&e.id()))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        if self.pods.len() + fresh.len() > MAX_POD_ENTRIES {
            return Err(LedgerError::PodEntriesFull {
                max: MAX_POD_ENTRIES,
            });
        }
        let ids: Vec<PodNsKey> = fresh.iter().map(PodLedgerEntry::id).collect();
        self.pods.extend(ids.iter().cloned().zip(fresh));
        if let Err(e) = self.persist() {
            for id in &ids {
                self.pods.remove(id);
            }
            return Err(e);
        }
        Ok(ids.len())
    }

    /// Removes the listed pod entries that exist and persists once (nothing is written when
    /// none exists). On error the ledger is unchanged.
    pub fn remove_pod_entries(
        &mut self,
        ids: &[PodNsKey],
    ) -> Result<Vec<PodLedgerEntry>, LedgerError> {
        let removed: Vec<PodLedgerEntry> =
            ids.iter().filter_map(|id| self.pods.remove(id)).collect();
        if removed.is_empty() {
            return Ok(removed);
        }
        if let Err(e) = self.persist() {
            for entry in removed {
                self.pods.insert(entry.id(), entry);
            }
            return Err(e);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10";

    fn key(s: &str) -> SysctlKey {
        SysctlKey::parse(s).expect("key")
    }

    fn entry(inode: u64, k: &str, original: &str) -> PodLedgerEntry {
        PodLedgerEntry::new(UID, inode, key(k), original, Some("squid"))
    }

    #[test]
    fn pod_entries_round_trip_first_original_only_one_rewrite_per_batch() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        let mut l = Ledger::load(&state).expect("load").ledger;
        l.record_original(&key("net.core.somaxconn"), "4096", None)
            .expect("host entry");
        let before = l.rewrites();
        let n = l
            .record_pod_originals(vec![
                entry(7, "net.ipv4.tcp_fin_timeout", "60"),
                entry(7, "net.ipv4.tcp_tw_reuse", "2"),
            ])
            .expect("record");
        assert_eq!((n, l.rewrites() - before), (2, 1));
        // A second original of the same key in the same namespace is not kept; another
        // namespace of the same pod (sandbox recreated) is another entry.
        let n = l
            .record_pod_originals(vec![
                entry(7, "net.ipv4.tcp_fin_timeout", "30"),
                entry(8, "net.ipv4.tcp_fin_timeout", "60"),
            ])
            .expect("record");
        assert_eq!(n, 1);
        drop(l);
        let l = Ledger::load(&state).expect("reload");
        assert!(l.set_aside.is_none());
        let l = l.ledger;
        assert_eq!(l.len(), 1, "host entries untouched");
        assert_eq!(l.pod_entries().count(), 3);
        let e = l
            .pod_entry(UID, 7, &key("net.ipv4.tcp_fin_timeout"))
            .expect("kept");
        assert_eq!(
            (e.original.as_str(), e.profile.as_deref()),
            ("60", Some("squid"))
        );
    }

    #[test]
    fn removing_pod_entries_persists_and_an_empty_list_leaves_the_file_as_before() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        let mut l = Ledger::load(&state).expect("load").ledger;
        l.record_pod_originals(vec![entry(7, "net.ipv4.tcp_fin_timeout", "60")])
            .expect("record");
        let id = (UID.to_string(), 7, key("net.ipv4.tcp_fin_timeout"));
        assert_eq!(
            l.remove_pod_entries(std::slice::from_ref(&id))
                .expect("rm")
                .len(),
            1
        );
        let before = l.rewrites();
        assert!(l.remove_pod_entries(&[id]).expect("rm").is_empty());
        assert_eq!(l.rewrites(), before, "nothing to remove: no rewrite");
        let text = std::fs::read_to_string(l.path()).expect("read");
        assert!(!text.contains("podEntries"), "{text}");
    }

    #[test]
    fn forged_pod_entries_are_dropped_and_named_the_good_ones_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        drop(Ledger::load(&state).expect("create"));
        let good = format!(
            r#"{{"podUid":"{UID}","netnsInode":7,"key":"net.ipv4.tcp_fin_timeout","original":"60","firstChangedUnix":1}}"#
        );
        let node_key = format!(
            r#"{{"podUid":"{UID}","netnsInode":7,"key":"vm.swappiness","original":"100","firstChangedUnix":1}}"#
        );
        let bad_uid = r#"{"podUid":"../../x","netnsInode":7,"key":"net.ipv4.tcp_tw_reuse","original":"1","firstChangedUnix":1}"#;
        std::fs::write(
            state.join("ledger.json"),
            format!(r#"{{"version":1,"entries":[],"podEntries":[{good},{node_key},{bad_uid},7]}}"#),
        )
        .expect("write");
        let out = Ledger::load(&state).expect("load");
        let aside = out.set_aside.expect("bad entries named");
        assert_eq!(aside.dropped, 3, "{}", aside.reason);
        assert!(aside.reason.contains("scope Node"), "{}", aside.reason);
        assert!(aside.reason.contains("not a uid"), "{}", aside.reason);
        let kept: Vec<_> = out.ledger.pod_entries().map(|e| e.key.dotted()).collect();
        assert_eq!(kept, ["net.ipv4.tcp_fin_timeout"]);
    }
}
