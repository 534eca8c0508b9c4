//! Reboots. The ledger's originals are values of one boot: after a reboot the kernel starts
//! again from the boot-time values (systemd-sysctl's files, the kernel defaults), which the
//! node's admin may have changed since. So on the first pass of a new boot the values found
//! before any write are this boot's originals, replacing the stale ones, and a restore puts
//! back what the node boots with now.
//!
//! Crash safety: the new originals and the new boot id are written in one atomic ledger
//! rewrite ([`Ledger::rebase_for_boot`]) *before* any kernel write of the pass. A SIGKILL before
//! that rewrite leaves the old boot id, and the next start re-reads a kernel nothing has
//! touched yet; after it, the ledger is this boot's and the usual record-before-write order
//! holds.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::key::SysctlKey;
use super::ledger::{Ledger, LedgerError, valid_boot_id};
use super::procfs::SysctlFs;

/// Where the kernel tells the boot id, relative to the sysctl root (`/proc/sys`).
pub const BOOT_ID_FILE: &str = "kernel/random/boot_id";

/// The boot id file under `fs`'s root.
pub fn boot_id_path(fs: &SysctlFs) -> PathBuf {
    fs.path_of(&SysctlKey::parse(BOOT_ID_FILE).unwrap_or_else(|_| unreachable!("a valid key")))
}

/// Reading the boot id failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The file could not be read.
    #[error("could not read the boot id from {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// It does not hold a boot id.
    #[error("{} does not hold a boot id (a UUID)", path.display())]
    Malformed { path: PathBuf },
    /// The ledger could not be rewritten for the new boot.
    #[error("could not record the originals of the new boot: {0}")]
    Ledger(#[from] LedgerError),
}

/// The boot id in `path` (37 bytes at most are read).
pub fn read_boot_id(path: &Path) -> Result<String, BootError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64).read_to_string(&mut text))
        .map_err(|source| BootError::Read {
            path: path.to_owned(),
            source,
        })?;
    let id = text.trim_end_matches('\n');
    if valid_boot_id(id) {
        Ok(id.to_owned())
    } else {
        Err(BootError::Malformed {
            path: path.to_owned(),
        })
    }
}

/// What the first pass must do about the boot, from the ledger's boot id and the kernel's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The ledger is this boot's.
    SameBoot,
    /// The ledger has no boot id (new, or from an older nodetune): its originals cannot be
    /// dated, so they are kept and the ledger is stamped with this boot.
    Adopt,
    /// The node rebooted since the ledger was written.
    Rebooted { previous: String },
}

/// The pure decision (see [`Decision`]).
pub fn decide(recorded: Option<&str>, current: &str) -> Decision {
    match recorded {
        Some(r) if r == current => Decision::SameBoot,
        Some(r) => Decision::Rebooted {
            previous: r.to_owned(),
        },
        None => Decision::Adopt,
    }
}

/// A reboot found and handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebased {
    pub previous_boot: String,
    pub boot: String,
    /// Keys whose original changed: `(key, stale original, this boot's value)`.
    pub changed: Vec<(SysctlKey, String, String)>,
}

/// Brings `ledger` to boot `current` before the pass writes anything (see the module docs).
/// A key that cannot be read now (its interface is gone) keeps its old original: a restore
/// will find it missing and drop it.
pub fn reconcile(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    current: &str,
) -> Result<Option<Rebased>, BootError> {
    let previous = match decide(ledger.boot_id(), current) {
        Decision::SameBoot => return Ok(None),
        Decision::Adopt => {
            ledger.rebase_for_boot(current, &BTreeMap::new())?;
            return Ok(None);
        }
        Decision::Rebooted { previous } => previous,
    };
    // A key nodetune persisted booted with nodetune's own value: its original is still the
    // one from before nodetune, not what the kernel holds now.
    let now: BTreeMap<SysctlKey, String> = ledger
        .entries()
        .filter(|e| !ledger.persisted().contains(&e.key))
        .filter_map(|e| fs.read(&e.key).ok().map(|v| (e.key.clone(), v)))
        .collect();
    let changed = ledger
        .entries()
        .filter_map(|e| {
            let v = now.get(&e.key)?;
            (!super::value::same(v, &e.original))
                .then(|| (e.key.clone(), e.original.clone(), v.clone()))
        })
        .collect();
    ledger.rebase_for_boot(current, &now)?;
    Ok(Some(Rebased {
        previous_boot: previous,
        boot: current.to_owned(),
        changed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10";
    const B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    #[test]
    fn the_decision() {
        assert_eq!(decide(Some(A), A), Decision::SameBoot);
        assert_eq!(decide(None, A), Decision::Adopt);
        assert_eq!(
            decide(Some(A), B),
            Decision::Rebooted {
                previous: A.to_owned()
            }
        );
    }

    #[test]
    fn boot_ids_are_checked() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("boot_id");
        std::fs::write(&p, format!("{A}\n")).expect("w");
        assert_eq!(read_boot_id(&p).expect("ok"), A);
        for bad in [
            "",
            "x\n",
            "0F6D4E3A-6B1E-4C2A-9D57-2F1C7D2B9A10\n",
            &format!("{A}{A}"),
        ] {
            std::fs::write(&p, bad).expect("w");
            assert!(
                matches!(read_boot_id(&p), Err(BootError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            read_boot_id(&d.path().join("none")),
            Err(BootError::Read { .. })
        ));
    }

    /// A fake /proc/sys and a ledger of boot A holding fin_timeout's original 60.
    fn booted_a() -> (tempfile::TempDir, tempfile::TempDir, SysctlFs, Ledger) {
        let proc_sys = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let fin = proc_sys.path().join("net/ipv4/tcp_fin_timeout");
        std::fs::create_dir_all(fin.parent().expect("p")).expect("mkdir");
        std::fs::write(&fin, "30\n").expect("w");
        let fs = SysctlFs::new(proc_sys.path());
        let mut ledger = Ledger::load(state.path()).expect("load").ledger;
        reconcile(&fs, &mut ledger, A).expect("adopt");
        let k = SysctlKey::parse("net.ipv4.tcp_fin_timeout").expect("k");
        ledger.record_original(&k, "60", None).expect("rec");
        (proc_sys, state, fs, ledger)
    }

    #[test]
    fn a_reboot_replaces_the_stale_originals_in_one_rewrite() {
        let (proc_sys, state, fs, mut ledger) = booted_a();
        assert_eq!(ledger.boot_id(), Some(A));
        assert_eq!(reconcile(&fs, &mut ledger, A).expect("same"), None);
        // Rebooted: the kernel holds the boot value the admin now configures.
        std::fs::write(proc_sys.path().join("net/ipv4/tcp_fin_timeout"), "45\n").expect("w");
        let before = ledger.rewrites();
        let r = reconcile(&fs, &mut ledger, B)
            .expect("ok")
            .expect("rebooted");
        assert_eq!(r.previous_boot, A);
        assert_eq!(r.changed.len(), 1);
        assert_eq!(ledger.rewrites(), before + 1, "one atomic rewrite");
        drop(ledger);
        let l = Ledger::load(state.path()).expect("load").ledger;
        assert_eq!(l.boot_id(), Some(B));
        assert_eq!(l.entries().next().expect("entry").original, "45");
    }

    /// Issue 19: a key nodetune persisted boots with nodetune's own value; taking that as the
    /// new original would make a restore "put back" the tuned value.
    #[test]
    fn a_persisted_key_keeps_its_original_across_a_reboot() {
        let (proc_sys, state, fs, mut ledger) = booted_a();
        let k = SysctlKey::parse("net.ipv4.tcp_fin_timeout").expect("k");
        ledger
            .set_persisted([k.clone()].into_iter().collect())
            .expect("persisted");
        // Booted with the value from nodetune's own sysctl.d file.
        std::fs::write(proc_sys.path().join("net/ipv4/tcp_fin_timeout"), "30\n").expect("w");
        let r = reconcile(&fs, &mut ledger, B)
            .expect("ok")
            .expect("rebooted");
        assert!(r.changed.is_empty(), "{:?}", r.changed);
        drop(ledger);
        let l = Ledger::load(state.path()).expect("load").ledger;
        assert_eq!(l.boot_id(), Some(B));
        assert_eq!(l.get(&k).expect("entry").original, "60");
        assert!(
            l.persisted().contains(&k),
            "the persisted keys survive a reload"
        );
    }

    #[test]
    fn a_failed_rewrite_keeps_the_old_boot_so_the_next_start_rebases_again() {
        let (proc_sys, state, fs, mut ledger) = booted_a();
        std::fs::write(proc_sys.path().join("net/ipv4/tcp_fin_timeout"), "45\n").expect("w");
        // The temp file's name taken by a directory: the rewrite fails, as a crash would stop it.
        std::fs::create_dir(state.path().join(".ledger.json.tmp")).expect("mkdir");
        assert!(reconcile(&fs, &mut ledger, B).is_err());
        assert_eq!(ledger.boot_id(), Some(A), "unchanged in memory");
        assert_eq!(ledger.entries().next().expect("e").original, "60");
        std::fs::remove_dir(state.path().join(".ledger.json.tmp")).expect("rmdir");
        assert!(reconcile(&fs, &mut ledger, B).expect("ok").is_some());
    }

    #[test]
    fn a_malformed_boot_id_in_the_ledger_is_damage_and_costs_no_entry() {
        let state = tempfile::tempdir().expect("tmp");
        std::fs::write(
            state.path().join("ledger.json"),
            r#"{"version": 1, "bootId": "../../etc", "entries": [
                {"key": "vm.a", "original": "1", "scope": "Node", "firstChangedUnix": 1}]}"#,
        )
        .expect("w");
        let out = Ledger::load(state.path()).expect("load");
        let aside = out.set_aside.expect("set aside for a person");
        assert!(aside.reason.contains("bootId"), "{}", aside.reason);
        assert_eq!((aside.kept, aside.dropped), (1, 0));
        assert_eq!(out.ledger.boot_id(), None);
    }
}
