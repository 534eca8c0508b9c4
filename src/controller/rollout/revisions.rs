//! Revision history: every change of a profile's `sysctls` or `mode` is a new revision.
use std::collections::BTreeMap;

use crate::api::Mode;
use crate::api::rollout::{
    MAX_REVISIONS, MAX_REVISIONS_BYTES, Revision, RolloutPhase, RolloutStatus, content_hash,
};

/// The rollout status with the spec's content as its newest revision. The first revision a
/// profile records is taken as already rolled out (stable): before `spec.rollout` existed every
/// node took the spec at once. A changed content is a new revision that supersedes whatever
/// was in flight: its rollout starts from the first wave, and the stable revision stays the
/// last one that finished. Returns whether a new revision was made.
pub fn record(
    previous: Option<&RolloutStatus>,
    sysctls: &BTreeMap<String, String>,
    mode: Mode,
) -> (RolloutStatus, bool) {
    let hash = content_hash(sysctls, mode);
    let mut status = previous.cloned().unwrap_or_default();
    if status.revisions.last().is_some_and(|r| r.hash == hash) {
        return (status, false);
    }
    let number = status.revisions.last().map_or(1, |r| r.number + 1);
    status.revisions.push(Revision {
        number,
        hash,
        sysctls: sysctls.clone(),
        mode,
        rolled_out: false,
    });
    status.current_revision = number;
    if status.stable_revision.is_none() {
        mark_rolled_out(&mut status, number);
    } else {
        status.phase = RolloutPhase::Progressing;
    }
    status.wave = 0;
    status.soaking.clear();
    status.failure = None;
    prune(&mut status);
    (status, true)
}

/// `number` finished rolling out: it becomes the stable revision, marked so (an undo after
/// a complete rollout goes back to the newest revision so marked before the current one).
pub fn mark_rolled_out(status: &mut RolloutStatus, number: i64) {
    status.stable_revision = Some(number);
    status.phase = RolloutPhase::Complete;
    for r in status.revisions.iter_mut().filter(|r| r.number == number) {
        r.rolled_out = true;
    }
}

/// The size of `revisions` as the status stores them (JSON).
fn bytes(revisions: &[Revision]) -> usize {
    revisions
        .iter()
        .map(|r| serde_json::to_vec(r).map_or(0, |v| v.len()))
        .sum()
}

/// Drops the oldest revisions past [`MAX_REVISIONS`] or [`MAX_REVISIONS_BYTES`], never the
/// stable nor the current one.
fn prune(status: &mut RolloutStatus) {
    let keep = [Some(status.current_revision), status.stable_revision];
    while status.revisions.len() > MAX_REVISIONS || bytes(&status.revisions) > MAX_REVISIONS_BYTES {
        let Some(at) = status
            .revisions
            .iter()
            .position(|r| !keep.contains(&Some(r.number)))
        else {
            return;
        };
        status.revisions.remove(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("net.core.somaxconn".to_string(), v.to_string())])
    }

    #[test]
    fn the_first_revision_is_stable_and_an_unchanged_spec_is_none() {
        let (s, new) = record(None, &values("4096"), Mode::Enforce);
        assert!(new);
        assert_eq!((s.current_revision, s.stable_revision), (1, Some(1)));
        assert_eq!(s.phase, RolloutPhase::Complete);
        let (again, new) = record(Some(&s), &values("4096"), Mode::Enforce);
        assert!(!new);
        assert_eq!(again, s);
    }

    #[test]
    fn an_edit_is_a_new_revision_that_rolls_out_and_a_mode_change_too() {
        let (s, _) = record(None, &values("4096"), Mode::Enforce);
        let (s, new) = record(Some(&s), &values("128"), Mode::Enforce);
        assert!(new);
        assert_eq!((s.current_revision, s.stable_revision), (2, Some(1)));
        assert_eq!(s.phase, RolloutPhase::Progressing);
        let (s, new) = record(Some(&s), &values("128"), Mode::DryRun);
        assert!(new, "mode is part of a revision");
        assert_eq!(s.current_revision, 3);
        assert_eq!(s.stable_revision, Some(1), "superseded 2 never finished");
    }

    #[test]
    fn history_is_bounded_but_keeps_the_stable_revision() {
        let (mut s, _) = record(None, &values("0"), Mode::Enforce);
        for i in 1..30 {
            s = record(Some(&s), &values(&i.to_string()), Mode::Enforce).0;
        }
        assert_eq!(s.revisions.len(), MAX_REVISIONS);
        assert_eq!(s.current_revision, 30);
        assert!(
            s.revision(1).is_some(),
            "stable 1 kept while nothing finished"
        );
        assert!(s.revision(30).is_some());
        assert!(s.revision(2).is_none(), "oldest non-stable dropped");
    }

    /// Values long enough that a few revisions fill [`MAX_REVISIONS_BYTES`].
    fn big(i: usize) -> BTreeMap<String, String> {
        (0..40)
            .map(|k| {
                (
                    format!("net.ipv4.conf.eth{k}.arp_ignore"),
                    format!("{i}{}", "0".repeat(400)),
                )
            })
            .collect()
    }

    #[test]
    fn history_is_bounded_in_bytes_too_keeping_current_and_stable() {
        let (mut s, _) = record(None, &big(0), Mode::Enforce);
        for i in 1..10 {
            s = record(Some(&s), &big(i), Mode::Enforce).0;
            assert!(
                bytes(&s.revisions) <= MAX_REVISIONS_BYTES,
                "{} bytes after revision {}",
                bytes(&s.revisions),
                s.current_revision
            );
        }
        assert!(s.revisions.len() < MAX_REVISIONS, "{}", s.revisions.len());
        assert!(s.revisions.len() >= 2);
        assert!(s.revision(1).is_some(), "the stable one is kept");
        assert!(s.revision(10).is_some(), "the current one is kept");
        // Numbers keep counting: a dropped revision is never reused.
        assert_eq!(s.current_revision, 10);
        // A lone revision over the cap is kept all the same: the agents need it.
        let (alone, _) = record(
            None,
            &big(0).into_iter().chain(big(1)).collect(),
            Mode::Enforce,
        );
        assert_eq!(alone.revisions.len(), 1);
    }

    #[test]
    fn revisions_that_finished_are_marked_and_others_not() {
        let (s, _) = record(None, &values("4096"), Mode::Enforce);
        assert!(
            s.revisions[0].rolled_out,
            "the first is taken as rolled out"
        );
        let (mut s, _) = record(Some(&s), &values("128"), Mode::Enforce);
        assert!(!s.revisions[1].rolled_out);
        mark_rolled_out(&mut s, 2);
        assert!(s.revisions.iter().all(|r| r.rolled_out));
        assert_eq!(
            (s.stable_revision, s.phase),
            (Some(2), RolloutPhase::Complete)
        );
    }
}
