//! One pass over the node's kernel: apply what the merged profiles want, restore what no profile
//! wants any more, notice drift. Works on the local /proc/sys and ledger only, so it keeps
//! running while the API server is away.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use super::contest::{ContestLimits, Contests};
use super::persist;

use crate::api::{KeyState, Mode, NodeTuningProfile};
use crate::plan::Merged;
use crate::sysctl::{self, KeyResult, Ledger, Policy, SysctlFs, SysctlKey};

/// What the tuner remembers between passes.
#[derive(Default)]
pub struct Tuner {
    /// The cluster sysctl policy, re-read every pass (a mounted ConfigMap changes in place, and
    /// a stricter policy must also hold for profiles admitted earlier). `None`: built-in rules.
    policy_file: Option<PathBuf>,
    /// Fingerprint of the policy file as the last pass read it, so the agent's wait can tell
    /// a changed policy (a ConfigMap update projected into the pod) and start a pass at once.
    policy_seen: Option<u64>,
    /// Key → value this agent last verified in the kernel (Enforce only): a later pass that has
    /// to write it again found drift.
    verified: BTreeMap<String, String>,
    /// The last restore of each key, shown in reports until the key is wanted again.
    restored: BTreeMap<String, KeyResult>,
    pub drift_corrections: u64,
    /// Keys another writer keeps changing, and their pauses.
    contests: Contests,
    /// The host root for the persistence file (`spec.persist`); `None`: never persisted.
    host_root: Option<PathBuf>,
    /// The keys in the persistence file after the last pass.
    persisted: Vec<String>,
    /// Contested key → (its pause's end, the same in wall time as first reported).
    pause_ends: BTreeMap<
        String,
        (
            Instant,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
        ),
    >,
}

pub struct PassOutcome {
    pub results: Vec<KeyResult>,
    pub restored: Vec<KeyResult>,
    pub warnings: Vec<String>,
    /// Drift corrections made in this pass.
    pub drifted: u64,
    /// Originals put back in this pass (`restored` also lists earlier ones still shown).
    pub restores: u64,
    /// Contested keys left alone in this pass (a correction not made).
    pub held: u64,
    /// Keys that became contested in this pass.
    pub newly_contested: u64,
}

impl Tuner {
    /// A tuner that checks every write against the policy in `policy_file`, if any.
    pub fn with_policy_file(policy_file: Option<PathBuf>) -> Self {
        Self {
            policy_file,
            ..Self::default()
        }
    }

    /// Also keep the persistence file under `host_root` (see [`persist`]).
    pub fn persisting_to(mut self, host_root: PathBuf) -> Self {
        self.host_root = Some(host_root);
        self
    }

    /// When keys count as contested and how long they are left alone.
    pub fn contest_limits(mut self, limits: ContestLimits) -> Self {
        self.contests = Contests::new(limits);
        self
    }

    /// Adds what the report shows of the tuner's memory: persisted and contested keys.
    pub fn annotate(&mut self, status: &mut crate::api::NodeTuningReportStatus) {
        let now = Instant::now();
        status.persisted = self.persisted.clone();
        let contested = self.contests.contested(now);
        // A pause's end in wall time, computed once per pause: recomputed every pass it would
        // move by microseconds and make every report a new state to write.
        self.pause_ends
            .retain(|k, _| contested.iter().any(|c| &c.key == k));
        status.contested = contested
            .into_iter()
            .take(crate::api::MAX_CONTESTED)
            .map(|c| {
                let backoff_until = c.hold_until.and_then(|u| {
                    let cached = self.pause_ends.get(&c.key).filter(|(at, _)| *at == u);
                    if let Some((_, t)) = cached {
                        return Some(t.clone());
                    }
                    let d = k8s_openapi::jiff::SignedDuration::try_from(u - now).ok()?;
                    let t = k8s_openapi::jiff::Timestamp::now().checked_add(d).ok()?;
                    let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t);
                    self.pause_ends.insert(c.key.clone(), (u, t.clone()));
                    Some(t)
                });
                crate::api::ContestedKey {
                    profile: status
                        .sysctls
                        .iter()
                        .find(|e| e.key == c.key)
                        .and_then(|e| e.profile.clone()),
                    key: c.key,
                    foreign_value: crate::sysctl::value::normalize(&c.foreign),
                    corrections: c.corrections as i64,
                    source: None,
                    backoff_until,
                }
            })
            .collect();
    }

    /// Forgets which values were verified: after a reboot the kernel starts from its boot
    /// values, and writing them again is the first application, not drift.
    pub fn forget_verified(&mut self) {
        self.verified.clear();
    }

    /// The policy for this pass. An unusable policy file refuses every write (fail closed) and
    /// says why in the pass's warnings; the pass still runs, so counting and reporting go on.
    fn policy(&mut self, warnings: &mut Vec<String>) -> Policy {
        let Some(path) = &self.policy_file else {
            return Policy::default();
        };
        // Taken before the read: a change racing with it is seen by the next check.
        self.policy_seen = Some(fingerprint(path));
        Policy::from_file(path).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cluster sysctl policy unusable; writing nothing");
            warnings.push(format!(
                "cluster sysctl policy unusable, nothing is written or restored until it is fixed: {e}"
            ));
            Policy::refuse_all(e.to_string())
        })
    }

    /// Whether the policy file differs from what the last pass read (appeared, vanished or
    /// changed). Cheap: one read of a small file; the agent asks every couple of seconds.
    pub fn policy_changed(&self) -> bool {
        match &self.policy_file {
            Some(path) => self.policy_seen != Some(fingerprint(path)),
            None => false,
        }
    }

    /// Apply `merged`, then restore ledger keys that are no longer desired. `all_profiles` is
    /// every profile the agent knows (matching or not), to honour `restoreOnRemoval: false` of
    /// the profile that set a key.
    pub fn pass(
        &mut self,
        fs: &SysctlFs,
        ledger: &mut Ledger,
        merged: &Merged,
        all_profiles: &[&NodeTuningProfile],
    ) -> PassOutcome {
        let mut out = PassOutcome {
            results: Vec::new(),
            restored: Vec::new(),
            warnings: Vec::new(),
            drifted: 0,
            restores: 0,
            held: 0,
            newly_contested: 0,
        };
        let policy = self.policy(&mut out.warnings);
        let now = Instant::now();
        let (held, results) = self.execute(fs, ledger, &policy, merged, now);
        out.held = held.len() as u64;
        // `execute` returns the desired keys first, in `merged.desired` order.
        for ((key, d), r) in merged.desired.iter().zip(&results) {
            self.restored.remove(key);
            if held.contains(key) {
                // Still ours to verify once the pause is over: its next correction is drift.
                continue;
            }
            if d.mode == Mode::Enforce && r.state == KeyState::Applied {
                if r.changed && self.verified.get(key) == Some(&d.value) {
                    out.drifted += 1;
                    tracing::warn!(key = %key, found = ?r.previous, wrote = %d.value, "drift corrected");
                    let found = r.previous.as_deref().unwrap_or_default();
                    if self.contests.corrected(key, found, now) {
                        out.newly_contested += 1;
                        tracing::warn!(key = %key, found, "contested: another writer keeps changing it; corrections back off");
                    }
                } else {
                    self.contests.settled(key, now);
                }
                self.verified.insert(key.clone(), d.value.clone());
            } else {
                self.verified.remove(key);
                self.contests.forget(key);
            }
        }
        out.results = results;

        self.restore_unwanted(fs, ledger, merged, all_profiles, &policy, &mut out);
        out.restored = self.restored.values().cloned().collect();
        self.drift_corrections += out.drifted;
        self.persist(ledger, merged, all_profiles, &policy, &mut out);
        out
    }

    /// Restores ledger keys no profile wants any more, or forgets their originals where the
    /// profile that set them says `restoreOnRemoval: false`.
    fn restore_unwanted(
        &mut self,
        fs: &SysctlFs,
        ledger: &mut Ledger,
        merged: &Merged,
        all_profiles: &[&NodeTuningProfile],
        policy: &Policy,
        out: &mut PassOutcome,
    ) {
        let unwanted: Vec<(SysctlKey, Option<String>)> = ledger
            .entries()
            .filter(|e| !merged.desired.contains_key(&e.key.dotted()))
            .map(|e| (e.key.clone(), e.profile.clone()))
            .collect();
        let mut keep = Vec::new();
        let mut restore = Vec::new();
        for (key, owner) in unwanted {
            self.verified.remove(&key.dotted());
            self.contests.forget(&key.dotted());
            if crate::plan::keeps_value_on_removal(owner.as_deref(), all_profiles) {
                keep.push(key);
            } else {
                restore.push(key);
            }
        }
        // restoreOnRemoval: false: the value stays; forget the original so it is never put
        // back behind the user's back later.
        match ledger.remove_many(&keep) {
            Ok(_) => out.warnings.extend(keep.iter().map(|k| {
                format!(
                    "{k}: kept the tuned value after its profile stopped applying (restoreOnRemoval: false)"
                )
            })),
            Err(e) => out
                .warnings
                .extend(keep.iter().map(|k| format!("{k}: could not update the ledger: {e}"))),
        }
        // One ledger rewrite for all restores of this pass.
        for r in sysctl::restore_keys(fs, ledger, &restore, policy) {
            tracing::info!(key = %r.key, state = ?r.state, value = ?r.actual, "restored original value");
            if r.state == KeyState::Restored {
                out.restores += 1;
            }
            self.restored.insert(r.key.clone(), r);
        }
    }

    /// `plan::execute`, except that contested keys in their pause are only read (evaluated as
    /// DryRun, then reported `Contested`). Returns the held keys and the results.
    fn execute(
        &self,
        fs: &SysctlFs,
        ledger: &mut Ledger,
        policy: &Policy,
        merged: &Merged,
        now: Instant,
    ) -> (Vec<String>, Vec<KeyResult>) {
        let held: Vec<String> = merged
            .desired
            .iter()
            .filter(|(k, d)| d.mode == Mode::Enforce && self.contests.holding(k, now))
            .map(|(k, _)| k.clone())
            .collect();
        if held.is_empty() {
            return (held, crate::plan::execute(fs, Some(ledger), policy, merged));
        }
        let mut run = merged.clone();
        for k in &held {
            if let Some(d) = run.desired.get_mut(k) {
                d.mode = Mode::DryRun;
            }
        }
        let mut results = crate::plan::execute(fs, Some(ledger), policy, &run);
        for (k, r) in merged.desired.keys().zip(results.iter_mut()) {
            if held.contains(k) && r.state == KeyState::DryRun {
                r.state = KeyState::Contested;
                r.message = Some(format!(
                    "another writer keeps setting {}: left alone for a while before the next correction (see contested)",
                    r.actual.as_deref().unwrap_or("another value")
                ));
            }
        }
        (held, results)
    }

    /// Brings the host's persistence file to the persistent keys this pass applied. Failures
    /// are warnings: the kernel holds the values either way, and the next pass tries again.
    fn persist(
        &mut self,
        ledger: &mut Ledger,
        merged: &Merged,
        all_profiles: &[&NodeTuningProfile],
        policy: &Policy,
        out: &mut PassOutcome,
    ) {
        let allowed = policy.allows_persist();
        for p in persist::refused(all_profiles, allowed) {
            if merged.desired.values().any(|d| d.profile == p) {
                out.warnings.push(format!(
                    "profile {p}: persist is not allowed by the cluster sysctl policy (allowPersist: false): its keys are applied but not written to the host's sysctl.d"
                ));
            }
        }
        let wanted = persist::wanted(merged, all_profiles, &out.results, allowed);
        let Some(root) = &self.host_root else {
            if !wanted.is_empty() {
                out.warnings
                    .push("persist: this agent has no host root; nothing is persisted".into());
            }
            return;
        };
        match persist::sync(root, ledger, &wanted) {
            Ok(s) => {
                if s.changed {
                    tracing::info!(
                        keys = s.keys.len(),
                        file = persist::FILE_NAME,
                        "persistence file updated"
                    );
                }
                self.persisted = wanted.into_keys().collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "persistence file not updated");
                out.warnings.push(format!("persist: {e}"));
                self.persisted = ledger.persisted().iter().map(|k| k.dotted()).collect();
            }
        }
    }
}

/// A hash of the file's content, or of the error kind reading it gave.
fn fingerprint(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(&mut h),
        Err(e) => e.kind().to_string().hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIN: &str = "net.ipv4.tcp_fin_timeout";

    /// A fake /proc/sys holding tcp_fin_timeout = 60, and an empty ledger.
    struct Node {
        proc_dir: tempfile::TempDir,
        _state: tempfile::TempDir,
        fs: SysctlFs,
        ledger: Ledger,
    }

    impl Node {
        fn new() -> Self {
            let proc_dir = tempfile::tempdir().expect("tmp");
            let state = tempfile::tempdir().expect("tmp");
            let path = proc_dir.path().join("net/ipv4/tcp_fin_timeout");
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, "60\n").expect("write");
            let fs = SysctlFs::new(proc_dir.path());
            let ledger = Ledger::load(state.path()).expect("ledger").ledger;
            Self {
                proc_dir,
                _state: state,
                fs,
                ledger,
            }
        }

        fn fin(&self) -> String {
            std::fs::read_to_string(self.proc_dir.path().join("net/ipv4/tcp_fin_timeout"))
                .expect("read")
                .trim()
                .to_string()
        }

        fn set_fin_behind_our_back(&self, v: &str) {
            std::fs::write(
                self.proc_dir.path().join("net/ipv4/tcp_fin_timeout"),
                format!("{v}\n"),
            )
            .expect("write");
        }

        fn pass(
            &mut self,
            t: &mut Tuner,
            wanted: &[&NodeTuningProfile],
            known: &[&NodeTuningProfile],
        ) -> PassOutcome {
            t.pass(
                &self.fs,
                &mut self.ledger,
                &crate::plan::merge(wanted.iter().copied()),
                known,
            )
        }
    }

    fn profile(name: &str, restore: bool, mode: Mode) -> NodeTuningProfile {
        let mut p = NodeTuningProfile::test(name)
            .with_sysctls(&[(FIN, "30")])
            .with_mode(mode);
        p.spec.restore_on_removal = restore;
        p
    }

    #[test]
    fn applies_detects_drift_and_restores() {
        let mut node = Node::new();
        let p = profile("web", true, Mode::Enforce);
        let mut t = Tuner::default();

        let out = node.pass(&mut t, &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::Applied);
        assert_eq!(out.drifted, 0);
        assert_eq!(node.fin(), "30");

        // Someone writes the key behind our back: the next pass puts it back and counts it.
        node.set_fin_behind_our_back("45");
        let out = node.pass(&mut t, &[&p], &[&p]);
        assert_eq!(out.drifted, 1);
        assert_eq!(t.drift_corrections, 1);
        assert_eq!(node.fin(), "30");

        // The profile no longer applies: the original comes back and the ledger empties.
        let out = node.pass(&mut t, &[], &[&p]);
        assert_eq!(out.restored.len(), 1);
        assert_eq!(out.restored[0].state, KeyState::Restored);
        assert_eq!(out.restores, 1);
        assert!(node.ledger.is_empty());
        assert_eq!(node.fin(), "60");

        // The restore stays listed, but it happened once.
        let out = node.pass(&mut t, &[], &[&p]);
        assert_eq!(out.restored.len(), 1);
        assert_eq!(out.restores, 0);
    }

    #[test]
    fn a_restore_that_cannot_happen_is_not_counted() {
        let mut node = Node::new();
        let p = profile("web", true, Mode::Enforce);
        let mut t = Tuner::default();
        node.pass(&mut t, &[&p], &[&p]);
        // The key vanished (module unloaded): nothing to put back.
        std::fs::remove_file(node.proc_dir.path().join("net/ipv4/tcp_fin_timeout")).expect("rm");
        let out = node.pass(&mut t, &[], &[&p]);
        assert_eq!(out.restored[0].state, KeyState::Unsupported);
        assert_eq!(out.restores, 0);
    }

    #[test]
    fn restore_on_removal_false_keeps_the_value() {
        let mut node = Node::new();
        let p = profile("keep", false, Mode::Enforce);
        let mut t = Tuner::default();
        node.pass(&mut t, &[&p], &[&p]);
        let out = node.pass(&mut t, &[], &[&p]);
        assert!(out.restored.is_empty());
        assert!(
            out.warnings[0].contains("restoreOnRemoval: false"),
            "{:?}",
            out.warnings
        );
        assert!(node.ledger.is_empty());
        assert_eq!(node.fin(), "30");
    }

    /// A policy file that goes bad refuses every write and restore (fail closed) but the pass
    /// goes on; a stricter policy also holds for a profile applied earlier.
    #[test]
    fn policy_is_reread_each_pass_and_fails_closed() {
        let mut node = Node::new();
        let dir = tempfile::tempdir().expect("tmp");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, "allowedScopes: [NetworkNamespace]\n").expect("write");
        let mut t = Tuner::with_policy_file(Some(policy.clone()));
        let p = profile("web", true, Mode::Enforce);
        let out = node.pass(&mut t, &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::Applied);
        assert_eq!(node.fin(), "30");

        std::fs::write(&policy, "allowedScopes: [Node\n").expect("write");
        node.set_fin_behind_our_back("45");
        let out = node.pass(&mut t, &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::Denied, "{:?}", out.results);
        assert!(out.warnings.iter().any(|w| w.contains("policy unusable")));
        assert_eq!(node.fin(), "45", "nothing written");
        let out = node.pass(&mut t, &[], &[&p]);
        assert_eq!(out.restored[0].state, KeyState::Denied);
        assert_eq!(node.fin(), "45", "nothing restored");
        assert_eq!(node.ledger.len(), 1, "original kept");

        std::fs::write(&policy, "deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']\n").expect("write");
        let out = node.pass(&mut t, &[&p], &[&p]);
        assert!(
            out.results[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("deniedKeys")),
            "{:?}",
            out.results
        );
        std::fs::write(&policy, "{}\n").expect("write");
        let out = node.pass(&mut t, &[], &[&p]);
        assert_eq!(out.restored[0].state, KeyState::Restored);
        assert_eq!(node.fin(), "60");
    }

    /// Issue 17 item 11: a higher-priority DryRun profile on the same key left the Enforce
    /// profile's key `Overridden`, neither written nor drift-corrected.
    #[test]
    fn a_dry_run_preview_keeps_the_key_enforced_and_drift_corrected() {
        let mut node = Node::new();
        let enforce = profile("base", true, Mode::Enforce);
        let mut preview = profile("try", true, Mode::DryRun);
        preview.spec.priority = 100;
        preview.spec.sysctls = [(FIN.to_string(), "20".to_string())].into();
        let mut t = Tuner::default();
        let both = [&enforce, &preview];
        let out = node.pass(&mut t, &both, &both);
        assert_eq!(node.fin(), "30");
        let states: Vec<KeyState> = out.results.iter().map(|r| r.state).collect();
        assert_eq!(states, [KeyState::Applied, KeyState::DryRun]);

        node.set_fin_behind_our_back("2");
        let out = node.pass(&mut t, &both, &both);
        assert_eq!(out.drifted, 1);
        assert_eq!(node.fin(), "30");
    }

    /// Issue 17 item 16: a misspelled key was `Unsupported` with no hint.
    #[test]
    fn a_misspelled_key_names_the_nearest_key_the_node_has() {
        let mut node = Node::new();
        let mut p = profile("typo", true, Mode::Enforce);
        p.spec.sysctls = [("net.ipv4.tcp_fin_timeot".to_string(), "30".to_string())].into();
        let out = node.pass(&mut Tuner::default(), &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::Unsupported);
        let msg = out.results[0].message.as_deref().unwrap_or_default();
        assert!(
            msg.ends_with("did you mean `net.ipv4.tcp_fin_timeout`?"),
            "{msg}"
        );
    }

    /// Issue 17 item 12: the agent notices a changed policy file between passes (the wait
    /// polls this), not only at the next interval.
    #[test]
    fn a_changed_policy_file_is_noticed_before_the_next_pass() {
        let mut node = Node::new();
        let dir = tempfile::tempdir().expect("tmp");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, "{}\n").expect("write");
        let mut t = Tuner::with_policy_file(Some(policy.clone()));
        assert!(t.policy_changed(), "never read yet");
        let p = profile("web", true, Mode::Enforce);
        node.pass(&mut t, &[&p], &[&p]);
        assert!(!t.policy_changed());
        std::fs::write(&policy, "deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']\n").expect("write");
        assert!(t.policy_changed());
        let out = node.pass(&mut t, &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::Denied);
        assert!(!t.policy_changed());
        std::fs::remove_file(&policy).expect("rm");
        assert!(t.policy_changed(), "a vanished file is a change too");
        assert!(
            !Tuner::default().policy_changed(),
            "no policy file: nothing to watch"
        );
    }

    #[test]
    fn dry_run_writes_nothing() {
        let mut node = Node::new();
        let p = profile("dry", true, Mode::DryRun);
        let out = node.pass(&mut Tuner::default(), &[&p], &[&p]);
        assert_eq!(out.results[0].state, KeyState::DryRun);
        assert!(node.ledger.is_empty());
        assert_eq!(node.fin(), "60");
    }
}
