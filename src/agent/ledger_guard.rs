//! The agent and a ledger it cannot trust. A ledger that cannot be loaded (unreadable, written
//! by a newer nodetune, an unsafe state directory, locked by `restore --local`), or a damaged one
//! set aside as `ledger.json.corrupt-*`, means originals may be missing from what the agent
//! would use: writing now could record an already tuned value as the "original" and lose the
//! real one. So the agent fails closed instead of exiting (no crash loop; metrics, TCP counts
//! and reports go on): nothing is written or restored, every key is reported refused with the
//! reason, and the report is Stalled (`LedgerUnusable`) until a person has looked: the load
//! succeeds again, and no set-aside copy is left in the state directory (remove or rename it
//! once its originals are checked).
//!
//! The state directory is walked and checked once, then held open for the agent's lifetime:
//! every reload reads the ledger in that directory, so a directory swapped in at the same path
//! later (by whoever could write a parent) is never read. Until the walk succeeds it is retried
//! each pass like a failed load.
use std::path::{Path, PathBuf};

use crate::sysctl::state_dir::StateDir;
use crate::sysctl::{Ledger, LedgerError, LoadOutcome};

/// The ledger as the agent holds it.
pub enum Guarded {
    Usable(Ledger),
    /// The last load failed; retried every pass.
    Unloadable(String),
}

pub struct LedgerGuard {
    state_dir: PathBuf,
    /// The state directory once a walk accepted it.
    held: Option<StateDir>,
    pub ledger: Guarded,
}

impl LedgerGuard {
    /// Load the ledger; a failure is kept (and retried later), never fatal.
    pub fn open(state_dir: &Path) -> Self {
        let mut g = Self {
            state_dir: state_dir.to_path_buf(),
            held: None,
            ledger: Guarded::Unloadable(String::new()),
        };
        g.reload();
        g
    }

    /// Loads the ledger from the held directory, walking to it first if none is held yet.
    fn load(&mut self) -> Result<LoadOutcome, LedgerError> {
        let dir = match &self.held {
            Some(dir) => dir.try_clone()?,
            None => {
                let dir = StateDir::open(&self.state_dir)?;
                let copy = dir.try_clone()?;
                self.held = Some(dir);
                copy
            }
        };
        Ledger::load_in(dir)
    }

    fn reload(&mut self) {
        self.ledger = match self.load() {
            Ok(loaded) => {
                if let Some(aside) = &loaded.set_aside {
                    tracing::error!(
                        reason = %aside.reason,
                        moved_to = %aside.moved_to.display(),
                        "the ledger was damaged and set aside; nothing is written until it is checked"
                    );
                }
                Guarded::Usable(loaded.ledger)
            }
            Err(e) => {
                tracing::error!(error = %e, "the ledger cannot be loaded; nothing is written");
                Guarded::Unloadable(unloadable(&e))
            }
        };
    }

    /// Why nothing may be written in this pass, if anything: retries a failed load, then looks
    /// for a set-aside copy.
    pub fn problem(&mut self) -> Option<String> {
        if matches!(self.ledger, Guarded::Unloadable(_)) {
            self.reload();
        }
        let ledger = match &self.ledger {
            Guarded::Unloadable(why) => return Some(why.clone()),
            Guarded::Usable(ledger) => ledger,
        };
        ledger.set_aside_copy().map(|p| {
            format!(
                "a damaged ledger was set aside at {}: the original values it held must be checked \
                 by hand; nothing is written or restored until that file is removed or renamed",
                p.display()
            )
        })
    }
}

fn unloadable(e: &LedgerError) -> String {
    format!("the ledger of original values cannot be used ({e}); nothing is written or restored")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysctl::ledger::LEDGER_FILE;

    fn state_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        // The ledger refuses state directories others can write.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        d
    }

    #[test]
    fn a_clean_state_dir_has_no_problem() {
        let d = state_dir();
        let mut g = LedgerGuard::open(d.path());
        assert!(matches!(g.ledger, Guarded::Usable(_)));
        assert_eq!(g.problem(), None);
    }

    #[test]
    fn a_corrupt_ledger_is_set_aside_and_blocks_writes_until_the_copy_is_renamed() {
        let d = state_dir();
        std::fs::write(d.path().join(LEDGER_FILE), "{ not json").expect("write");
        let mut g = LedgerGuard::open(d.path());
        let why = g.problem().expect("blocked");
        assert!(why.contains("ledger.json.corrupt-"), "{why}");
        // Still blocked on the next pass (and after a restart: the copy is still there).
        drop(g);
        let mut g = LedgerGuard::open(d.path());
        assert!(g.problem().is_some());
        // Checked by a person and renamed: writes resume.
        let copy = match &g.ledger {
            Guarded::Usable(l) => l.set_aside_copy().expect("copy"),
            Guarded::Unloadable(why) => panic!("{why}"),
        };
        std::fs::rename(&copy, d.path().join("checked-ledger.json")).expect("rename");
        assert_eq!(g.problem(), None);
    }

    #[test]
    fn an_unloadable_ledger_is_reported_and_retried_not_fatal() {
        let d = state_dir();
        // Held by someone else (e.g. `nodetune restore --local` running).
        let held = Ledger::load(d.path()).expect("first");
        let mut g = LedgerGuard::open(d.path());
        let why = g.problem().expect("blocked");
        assert!(why.contains("cannot be used"), "{why}");
        drop(held);
        assert_eq!(g.problem(), None, "the next pass loads it");
        assert!(matches!(g.ledger, Guarded::Usable(_)));
    }
}
