//! Kernel tests for the state directory (issue 17, item 6): the walk from `/` that refuses
//! parents others could write, and the directory held open so that swapping it afterwards
//! (`renameat2(RENAME_EXCHANGE)`, what a local user with a writable parent would do) never makes
//! the agent read the swapped-in ledger.
//!
//! Needs root (ownership changes, and the swap stands in for another user); everything happens
//! in temporary directories the tests create.

mod kernel;

use kernel::root_or_skip;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nodetune::agent::ledger_guard::{Guarded, LedgerGuard};
use nodetune::sysctl::{Ledger, LedgerError, SysctlKey};

const FIN: &str = "net.ipv4.tcp_fin_timeout";
const SYNCOOKIES: &str = "net.ipv4.tcp_syncookies";

fn key(s: &str) -> SysctlKey {
    SysctlKey::parse(s).expect("key")
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir(path).expect("mkdir");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The refusal for `state`, which must name `culprit` and say `needle`; nothing is created.
fn refused(state: &Path, culprit: &Path, needle: &str) {
    let err = Ledger::load(state).expect_err("refused");
    let LedgerError::UnsafeStateDir { path, reason } = &err else {
        panic!("{}: expected UnsafeStateDir, got {err}", state.display());
    };
    assert_eq!(path, culprit, "{err}");
    assert!(reason.contains(needle), "{needle:?} not in: {err}");
    assert!(!state.exists(), "{} was created", state.display());
}

/// A parent anyone may write (0777, no sticky bit) lets another user rename the state directory
/// away and put their own in its place: refused, naming the parent and the fix. So are a parent
/// writable by a group other than root's, a parent owned by another user, and a symlink on the
/// way. A sticky parent (`/tmp`'s 1777) and root's group are accepted.
#[test]
fn parents_others_could_write_are_refused_with_a_clear_error() {
    if !root_or_skip("parents_others_could_write_are_refused_with_a_clear_error") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let open = tmp.path().join("open");
    mkdir(&open, 0o777);
    refused(
        &open.join("state"),
        &open,
        "writable by others (mode 0777) without the sticky bit, so another user could swap \
         the state directory",
    );

    let group = tmp.path().join("group");
    mkdir(&group, 0o775);
    std::os::unix::fs::chown(&group, None, Some(12345)).expect("chgrp");
    refused(
        &group.join("state"),
        &group,
        "writable by group 12345 (mode 0775)",
    );

    let theirs = tmp.path().join("theirs");
    mkdir(&theirs, 0o755);
    std::os::unix::fs::chown(&theirs, Some(12345), None).expect("chown");
    refused(&theirs.join("state"), &theirs, "owned by uid 12345");

    let real = tmp.path().join("real");
    mkdir(&real, 0o755);
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    refused(&link.join("state"), &link, "symlink");
    assert!(!real.join("state").exists(), "the link was followed");

    let sticky = tmp.path().join("sticky");
    mkdir(&sticky, 0o1777);
    let rootgroup = sticky.join("rootgroup");
    mkdir(&rootgroup, 0o775);
    std::os::unix::fs::chown(&rootgroup, None, Some(0)).expect("chgrp");
    let state = rootgroup.join("a").join("state");
    Ledger::load(&state).expect("sticky parent and root's group accepted");
    let mode = fs::metadata(&state).expect("created").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "created for its owner only");
}

/// The agent checked and holds the state directory; then someone exchanges it for a directory
/// of their own, with a forged ledger and a planted set-aside copy. The agent's next load (here
/// after `restore --local` released the lock) reads the directory it checked, not the swapped-in
/// one, and its writes go there too.
#[test]
fn a_state_directory_swapped_after_the_check_is_not_read() {
    if !root_or_skip("a_state_directory_swapped_after_the_check_is_not_read") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let parent = tmp.path().join("lib");
    mkdir(&parent, 0o755);
    let state = parent.join("nodetune");
    let mut real = Ledger::load(&state).expect("real ledger").ledger;
    real.record_original(&key(FIN), "60", Some("web"))
        .expect("record");

    let forged = parent.join("forged");
    mkdir(&forged, 0o700);
    let forged_ledger = r#"{"version": 1, "entries": [
        {"key": "net.ipv4.tcp_syncookies", "original": "0", "scope": "NetworkNamespace", "firstChangedUnix": 1}
    ]}"#;
    fs::write(forged.join("ledger.json"), forged_ledger).expect("forge");
    fs::write(forged.join("ledger.json.corrupt-1"), "planted").expect("plant");

    // The agent starts while `restore --local` holds the ledger: the walk succeeds, the load
    // waits for the next pass.
    let mut guard = LedgerGuard::open(&state);
    assert!(matches!(guard.ledger, Guarded::Unloadable(_)));

    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &state,
        rustix::fs::CWD,
        &forged,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .expect("renameat2(RENAME_EXCHANGE)");
    drop(real);

    assert_eq!(guard.problem(), None, "the planted copy was not looked at");
    let Guarded::Usable(ledger) = &mut guard.ledger else {
        panic!("the ledger did not load");
    };
    let keys: Vec<String> = ledger.entries().map(|e| e.key.dotted()).collect();
    assert_eq!(keys, [FIN], "the swapped-in ledger was read");

    ledger
        .record_original(&key("net.core.somaxconn"), "4096", None)
        .expect("record");
    let on_disk = |dir: &Path| fs::read_to_string(dir.join("ledger.json")).expect("ledger");
    assert_eq!(
        on_disk(&state),
        forged_ledger,
        "the swapped-in ledger was written"
    );
    let checked = on_disk(&forged); // the checked directory, now at the other name
    assert!(checked.contains("net.core.somaxconn"), "{checked}");
    assert!(!checked.contains(SYNCOOKIES), "{checked}");
}
