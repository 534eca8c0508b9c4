//! Which originals recorded in pods' namespaces to put back, forget or drop, pure.
//!
//! The ledger records originals per pod network namespace, named by the pod's uid and the
//! namespace's inode: a pod whose sandbox is recreated gets a new namespace that starts from
//! the kernel's defaults, so entries of the old one describe nothing that still exists.
use std::collections::BTreeMap;

use super::selection::PodPlan;
use crate::api::NodeTuningProfile;

/// One pod network namespace: the pod's uid and the namespace's inode (`stat /proc/PID/ns/net`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodNetns {
    pub uid: String,
    pub inode: u64,
}

/// An original value the ledger holds for one key in one pod namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPodKey {
    pub netns: PodNetns,
    /// Canonical dotted key.
    pub key: String,
    /// The profile that changed it, as the ledger recorded.
    pub profile: Option<String>,
}

/// What to do with a [`HeldPodKey`] no profile wants any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreDecision {
    /// The pod lives and no profile wants the key: write the original back.
    Restore,
    /// The profile that set it says `restoreOnRemoval: false`: leave the value, forget the
    /// original so it is never put back later behind the user's back.
    Forget,
    /// The namespace is gone (pod deleted, or its sandbox recreated): nothing to write to.
    /// Drop the entry so the ledger does not grow with every pod the node ever ran.
    Drop,
}

/// For every held key a profile no longer wants, what to do with it. Keys still desired in a
/// living pod's [`PodPlan`] (same uid, same namespace) are left out: the apply keeps them.
///
/// `living` maps the uid of every pod whose namespace the agent found this pass to that
/// namespace's inode. It must be the complete view: a pod missing from it is taken as gone and
/// its entries dropped, so a caller whose scan failed must not call this.
/// `all_profiles` is every profile the agent knows, for `restoreOnRemoval`.
pub fn restore_decisions(
    held: &[HeldPodKey],
    living: &BTreeMap<String, u64>,
    plans: &[PodPlan],
    all_profiles: &[&NodeTuningProfile],
) -> Vec<(HeldPodKey, RestoreDecision)> {
    let wanted: BTreeMap<&str, &PodPlan> = plans.iter().map(|p| (p.pod.uid.as_str(), p)).collect();
    held.iter()
        .filter_map(|h| {
            if living.get(&h.netns.uid) != Some(&h.netns.inode) {
                return Some((h.clone(), RestoreDecision::Drop));
            }
            let still_wanted = wanted
                .get(h.netns.uid.as_str())
                .is_some_and(|p| p.merged.desired.contains_key(&h.key));
            if still_wanted {
                return None;
            }
            let keep_value =
                crate::plan::keeps_value_on_removal(h.profile.as_deref(), all_profiles);
            Some((
                h.clone(),
                if keep_value {
                    RestoreDecision::Forget
                } else {
                    RestoreDecision::Restore
                },
            ))
        })
        .collect()
}
