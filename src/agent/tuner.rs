//! One pass over the node's kernel: apply what the merged profiles want, restore what no profile
//! wants any more, notice drift. Works on the local /proc/sys and ledger only, so it keeps
//! running while the API server is away.
use std::collections::BTreeMap;

use crate::api::{KeyState, Mode, NodeTuningProfile};
use crate::plan::Merged;
use crate::sysctl::{self, KeyResult, Ledger, SysctlFs, SysctlKey};

/// What the tuner remembers between passes.
#[derive(Default)]
pub struct Tuner {
    /// Key → value this agent last verified in the kernel (Enforce only): a later pass that has
    /// to write it again found drift.
    verified: BTreeMap<String, String>,
    /// The last restore of each key, shown in reports until the key is wanted again.
    restored: BTreeMap<String, KeyResult>,
    pub drift_corrections: u64,
}

pub struct PassOutcome {
    pub results: Vec<KeyResult>,
    pub restored: Vec<KeyResult>,
    pub warnings: Vec<String>,
    /// Drift corrections made in this pass.
    pub drifted: u64,
    /// Originals put back in this pass (`restored` also lists earlier ones still shown).
    pub restores: u64,
}

impl Tuner {
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
        };
        for (key, d) in &merged.desired {
            self.restored.remove(key);
            let r = match d.mode {
                Mode::Enforce => sysctl::apply_one(fs, ledger, key, &d.value, Some(&d.profile)),
                Mode::DryRun => sysctl::dry_run_one(fs, Some(ledger), key, &d.value),
            };
            if d.mode == Mode::Enforce && r.state == KeyState::Applied {
                if r.changed && self.verified.get(key) == Some(&d.value) {
                    out.drifted += 1;
                    tracing::warn!(key = %key, found = ?r.previous, wrote = %d.value, "drift corrected");
                }
                self.verified.insert(key.clone(), d.value.clone());
            } else {
                self.verified.remove(key);
            }
            out.results.push(r);
        }
        for rej in &merged.rejected {
            // The engine refuses these itself, with the same per-key states as everywhere else.
            out.results.push(sysctl::apply_one(
                fs,
                ledger,
                &rej.key,
                &rej.value,
                Some(&rej.profile),
            ));
        }

        let unwanted: Vec<(SysctlKey, Option<String>)> = ledger
            .entries()
            .filter(|e| !merged.desired.contains_key(&e.key.dotted()))
            .map(|e| (e.key.clone(), e.profile.clone()))
            .collect();
        for (key, owner) in unwanted {
            let dotted = key.dotted();
            self.verified.remove(&dotted);
            let keep = owner
                .as_deref()
                .and_then(|o| {
                    all_profiles
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(o))
                })
                .is_some_and(|p| !p.spec.restore_on_removal);
            if keep {
                // restoreOnRemoval: false: the value stays; forget the original so it is never
                // put back behind the user's back later.
                match ledger.remove(&key) {
                    Ok(_) => out.warnings.push(format!(
                        "{dotted}: kept the tuned value after its profile stopped applying (restoreOnRemoval: false)"
                    )),
                    Err(e) => out.warnings.push(format!("{dotted}: could not update the ledger: {e}")),
                }
                continue;
            }
            if let Some(r) = sysctl::restore_key(fs, ledger, &key) {
                tracing::info!(key = %dotted, state = ?r.state, value = ?r.actual, "restored original value");
                if r.state == KeyState::Restored {
                    out.restores += 1;
                }
                self.restored.insert(dotted, r);
            }
        }
        out.restored = self.restored.values().cloned().collect();
        self.drift_corrections += out.drifted;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeTuningProfileSpec;

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
        NodeTuningProfile::new(
            name,
            NodeTuningProfileSpec {
                sysctls: [(FIN.to_string(), "30".to_string())].into(),
                restore_on_removal: restore,
                mode,
                ..Default::default()
            },
        )
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
