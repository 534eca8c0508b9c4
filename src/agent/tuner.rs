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

    fn fake_proc(dir: &std::path::Path, files: &[(&str, &str)]) -> SysctlFs {
        for (rel, v) in files {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, format!("{v}\n")).expect("write");
        }
        SysctlFs::new(dir)
    }

    fn profile(name: &str, restore: bool, sysctls: &[(&str, &str)]) -> NodeTuningProfile {
        NodeTuningProfile::new(
            name,
            NodeTuningProfileSpec {
                sysctls: sysctls
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                restore_on_removal: restore,
                ..Default::default()
            },
        )
    }

    #[test]
    fn applies_detects_drift_and_restores() {
        let proc_dir = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fs = fake_proc(proc_dir.path(), &[("net/ipv4/tcp_fin_timeout", "60")]);
        let mut ledger = Ledger::load(state.path()).expect("ledger").ledger;
        let p = profile("web", true, &[("net.ipv4.tcp_fin_timeout", "30")]);
        let mut t = Tuner::default();

        let out = t.pass(&fs, &mut ledger, &crate::plan::merge([&p]), &[&p]);
        assert_eq!(out.results[0].state, KeyState::Applied);
        assert_eq!(out.drifted, 0);
        assert_eq!(
            fs.read(&SysctlKey::parse("net.ipv4.tcp_fin_timeout").expect("key"))
                .expect("read"),
            "30"
        );

        // Someone writes the key behind our back: the next pass puts it back and counts it.
        std::fs::write(proc_dir.path().join("net/ipv4/tcp_fin_timeout"), "45\n").expect("write");
        let out = t.pass(&fs, &mut ledger, &crate::plan::merge([&p]), &[&p]);
        assert_eq!(out.drifted, 1);
        assert_eq!(t.drift_corrections, 1);

        // The profile no longer applies: the original comes back and the ledger empties.
        let out = t.pass(&fs, &mut ledger, &Merged::default(), &[&p]);
        assert_eq!(out.restored.len(), 1);
        assert_eq!(out.restored[0].state, KeyState::Restored);
        assert!(ledger.is_empty());
        assert_eq!(
            std::fs::read_to_string(proc_dir.path().join("net/ipv4/tcp_fin_timeout"))
                .expect("read")
                .trim(),
            "60"
        );
    }

    #[test]
    fn restore_on_removal_false_keeps_the_value() {
        let proc_dir = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fs = fake_proc(proc_dir.path(), &[("net/ipv4/tcp_fin_timeout", "60")]);
        let mut ledger = Ledger::load(state.path()).expect("ledger").ledger;
        let p = profile("keep", false, &[("net.ipv4.tcp_fin_timeout", "30")]);
        let mut t = Tuner::default();
        t.pass(&fs, &mut ledger, &crate::plan::merge([&p]), &[&p]);
        let out = t.pass(&fs, &mut ledger, &Merged::default(), &[&p]);
        assert!(out.restored.is_empty());
        assert!(
            out.warnings[0].contains("restoreOnRemoval: false"),
            "{:?}",
            out.warnings
        );
        assert!(ledger.is_empty());
        assert_eq!(
            std::fs::read_to_string(proc_dir.path().join("net/ipv4/tcp_fin_timeout"))
                .expect("read")
                .trim(),
            "30"
        );
    }

    #[test]
    fn dry_run_writes_nothing() {
        let proc_dir = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fs = fake_proc(proc_dir.path(), &[("net/ipv4/tcp_fin_timeout", "60")]);
        let mut ledger = Ledger::load(state.path()).expect("ledger").ledger;
        let mut p = profile("dry", true, &[("net.ipv4.tcp_fin_timeout", "30")]);
        p.spec.mode = Mode::DryRun;
        let out = Tuner::default().pass(&fs, &mut ledger, &crate::plan::merge([&p]), &[&p]);
        assert_eq!(out.results[0].state, KeyState::DryRun);
        assert!(ledger.is_empty());
        assert_eq!(
            std::fs::read_to_string(proc_dir.path().join("net/ipv4/tcp_fin_timeout"))
                .expect("read")
                .trim(),
            "60"
        );
    }
}
