//! Apply/restore logic against a fake `/proc/sys` tree of plain files.
//!
//! Plain files accept any value, so kernel refusals are simulated with real files that behave
//! like the kernel would: a symlink to `/proc/sys/kernel/ostype` (read-only sysctl: reads work,
//! opening for write fails with EACCES for everyone, root included, before anything is written)
//! and a symlink to `/dev/null` (writes succeed but read back empty: a read-back mismatch).
//! EINVAL and real read-back reformatting are covered by the kernel tests.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::sysctl::ledger::Ledger;

// The built-in rules only; the cluster policy has its own tests in `policy`.
fn apply_one(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    key: &str,
    desired: &str,
    profile: Option<&str>,
) -> KeyResult {
    super::apply_one(fs, ledger, key, desired, profile, &Policy::default())
}

fn dry_run_one(fs: &SysctlFs, ledger: Option<&Ledger>, key: &str, desired: &str) -> KeyResult {
    super::dry_run_one(fs, ledger, key, desired, &Policy::default())
}

fn restore_key(fs: &SysctlFs, ledger: &mut Ledger, key: &SysctlKey) -> Option<KeyResult> {
    super::restore_key(fs, ledger, key, &Policy::default())
}

fn restore_all(fs: &SysctlFs, ledger: &mut Ledger) -> Vec<KeyResult> {
    super::restore_all(fs, ledger, &Policy::default())
}

fn apply_all<K: AsRef<str>, V: AsRef<str>>(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    desired: impl IntoIterator<Item = (K, V)>,
    profile: Option<&str>,
) -> Vec<KeyResult> {
    desired
        .into_iter()
        .map(|(k, v)| apply_one(fs, ledger, k.as_ref(), v.as_ref(), profile))
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    fs: SysctlFs,
    ledger: Ledger,
    state: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proc-sys");
    for (path, value) in [
        ("net/ipv4/tcp_fin_timeout", "60\n"),
        ("net/ipv4/ip_local_port_range", "32768\t60999\n"),
        ("net/ipv4/tcp_syncookies", "1\n"),
        ("net/ipv4/conf/eth0.100/rp_filter", "0\n"),
        ("kernel/shmmax", "18446744073709551615\n"),
        ("kernel/core_pattern", "core\n"),
    ] {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, value).unwrap();
    }
    let state = dir.path().join("state");
    let ledger = Ledger::load(&state).unwrap().ledger;
    Fixture {
        fs: SysctlFs::new(&root),
        ledger,
        state,
        _dir: dir,
    }
}

fn file(f: &Fixture, path: &str) -> String {
    fs::read_to_string(f.fs.root.join(path)).unwrap()
}

fn key(s: &str) -> SysctlKey {
    SysctlKey::parse(s).unwrap()
}

#[test]
fn applies_changes_and_records_originals() {
    let mut f = fixture();
    let r = apply_one(
        &f.fs,
        &mut f.ledger,
        "net.ipv4.ip_local_port_range",
        "1024 65000",
        Some("web"),
    );
    assert_eq!(r.state, KeyState::Applied, "{r:?}");
    assert!(r.changed);
    assert_eq!(r.previous.as_deref(), Some("32768\t60999"));
    assert_eq!(r.actual.as_deref(), Some("1024 65000"));
    assert_eq!(r.original.as_deref(), Some("32768\t60999"));
    assert_eq!(r.scope, Scope::NetworkNamespace);
    assert_eq!(file(&f, "net/ipv4/ip_local_port_range"), "1024 65000\n");

    // a second change keeps the first original
    let r = apply_one(
        &f.fs,
        &mut f.ledger,
        "net/ipv4/ip_local_port_range",
        "5000 65000",
        Some("mail"),
    );
    assert_eq!(r.state, KeyState::Applied);
    assert_eq!(r.original.as_deref(), Some("32768\t60999"));
    let e = f.ledger.get(&key("net.ipv4.ip_local_port_range")).unwrap();
    assert_eq!(e.original, "32768\t60999");
    assert_eq!(e.profile.as_deref(), Some("web"));
}

#[test]
fn equal_after_normalisation_is_unchanged() {
    let mut f = fixture();
    let r = apply_one(
        &f.fs,
        &mut f.ledger,
        "net.ipv4.ip_local_port_range",
        " 32768   60999 ",
        None,
    );
    assert_eq!(r.state, KeyState::Applied);
    assert!(!r.changed);
    assert!(f.ledger.is_empty(), "nothing changed, nothing recorded");
    assert_eq!(file(&f, "net/ipv4/ip_local_port_range"), "32768\t60999\n");
}

#[test]
fn one_bad_key_does_not_stop_the_others() {
    let mut f = fixture();
    let desired = BTreeMap::from([
        ("net.ipv4.tcp_fin_timeout", "30"),
        ("net.ipv4.tcp_tw_recycle", "1"),
        ("kernel.core_pattern", "|/bin/false"),
        ("Net.ipv4.bad", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65000"),
        ("net.ipv4.conf.eth0/100.rp_filter", "2"),
        ("net.ipv4.tcp_syncookies", "1\n0"),
    ]);
    let results = apply_all(&f.fs, &mut f.ledger, &desired, Some("p"));
    let by_key: BTreeMap<&str, &KeyResult> = results.iter().map(|r| (r.key.as_str(), r)).collect();
    assert_eq!(results.len(), desired.len());

    assert_eq!(by_key["net.ipv4.tcp_fin_timeout"].state, KeyState::Applied);
    assert_eq!(
        by_key["net.ipv4.ip_local_port_range"].state,
        KeyState::Applied
    );
    assert_eq!(
        by_key["net.ipv4.conf.eth0/100.rp_filter"].state,
        KeyState::Applied
    );
    assert_eq!(file(&f, "net/ipv4/conf/eth0.100/rp_filter"), "2\n");

    let recycle = by_key["net.ipv4.tcp_tw_recycle"];
    assert_eq!(recycle.state, KeyState::Unsupported);
    let msg = recycle.message.as_deref().unwrap();
    assert!(msg.contains("4.12") && msg.contains("NAT"), "{msg}");
    assert!(!f.fs.root.join("net/ipv4/tcp_tw_recycle").exists());

    let core = by_key["kernel.core_pattern"];
    assert_eq!(core.state, KeyState::Denied);
    assert!(core.message.as_deref().unwrap().contains("policy"));
    assert_eq!(core.previous, None, "policy denial never reads the kernel");
    assert_eq!(file(&f, "kernel/core_pattern"), "core\n");

    assert_eq!(by_key["Net.ipv4.bad"].state, KeyState::Invalid);
    assert_eq!(by_key["Net.ipv4.bad"].scope, Scope::Node);
    assert_eq!(by_key["net.ipv4.tcp_syncookies"].state, KeyState::Invalid);
    assert_eq!(file(&f, "net/ipv4/tcp_syncookies"), "1\n");

    let recorded: Vec<String> = f.ledger.entries().map(|e| e.key.to_string()).collect();
    assert_eq!(
        recorded,
        [
            "net.ipv4.conf.eth0/100.rp_filter",
            "net.ipv4.ip_local_port_range",
            "net.ipv4.tcp_fin_timeout"
        ]
    );
}

#[test]
fn unsupported_per_device_key_hints_at_the_interface() {
    let mut f = fixture();
    let r = apply_one(
        &f.fs,
        &mut f.ledger,
        "net.ipv4.conf.eth9.rp_filter",
        "1",
        None,
    );
    assert_eq!(r.state, KeyState::Unsupported);
    assert!(r.message.unwrap().contains("interface"));
}

#[test]
fn refused_write_removes_the_fresh_ledger_entry() {
    let mut f = fixture();
    let ro = Path::new("/proc/sys/kernel/ostype");
    if !ro.exists() {
        eprintln!("skip: {} not available", ro.display());
        return;
    }
    symlink(ro, f.fs.root.join("net/ipv4/read_only")).unwrap();
    let r = apply_one(&f.fs, &mut f.ledger, "net.ipv4.read_only", "x", None);
    assert_eq!(r.state, KeyState::Denied, "{r:?}");
    assert!(!r.changed);
    assert_eq!(r.original, None);
    assert!(f.ledger.is_empty(), "kernel unchanged, so no ledger entry");
    drop(f.ledger);
    assert!(
        Ledger::load(&f.state).unwrap().ledger.is_empty(),
        "also on disk"
    );
}

#[test]
fn read_back_mismatch_is_failed_with_both_values_and_keeps_the_original() {
    let mut f = fixture();
    symlink("/dev/null", f.fs.root.join("net/ipv4/black_hole")).unwrap();
    let r = apply_one(&f.fs, &mut f.ledger, "net.ipv4.black_hole", "42", None);
    assert_eq!(r.state, KeyState::Failed, "{r:?}");
    assert_eq!(r.desired.as_deref(), Some("42"));
    assert_eq!(r.actual.as_deref(), Some(""));
    let msg = r.message.unwrap();
    assert!(msg.contains("\"42\"") && msg.contains("\"\""), "{msg}");
    assert!(f.ledger.get(&key("net.ipv4.black_hole")).is_some());
}

#[test]
fn ledger_failure_leaves_the_kernel_untouched() {
    let mut f = fixture();
    // the ledger's temp file path is a directory: persisting fails
    fs::create_dir(f.state.join(".ledger.json.tmp")).unwrap();
    let r = apply_one(&f.fs, &mut f.ledger, "net.ipv4.tcp_fin_timeout", "30", None);
    assert_eq!(r.state, KeyState::Failed);
    assert!(r.message.unwrap().contains("kernel not touched"));
    assert_eq!(file(&f, "net/ipv4/tcp_fin_timeout"), "60\n");
}

#[test]
fn dry_run_writes_nothing() {
    let mut f = fixture();
    apply_one(&f.fs, &mut f.ledger, "net.ipv4.tcp_fin_timeout", "45", None);
    let results: Vec<KeyResult> = [
        ("net.ipv4.tcp_fin_timeout", "30"),
        ("net.ipv4.ip_local_port_range", "32768 60999"),
        ("net.ipv4.tcp_tw_recycle", "1"),
        ("kernel.modprobe", "/x"),
    ]
    .into_iter()
    .map(|(k, v)| dry_run_one(&f.fs, Some(&f.ledger), k, v))
    .collect();
    assert_eq!(results[0].state, KeyState::DryRun);
    assert!(results[0].changed);
    assert_eq!(results[0].actual.as_deref(), Some("45"));
    assert_eq!(results[0].original.as_deref(), Some("60"));
    assert_eq!(results[1].state, KeyState::DryRun);
    assert!(!results[1].changed);
    assert_eq!(results[2].state, KeyState::Unsupported);
    assert_eq!(results[3].state, KeyState::Denied);
    assert_eq!(file(&f, "net/ipv4/tcp_fin_timeout"), "45\n");
    assert_eq!(f.ledger.len(), 1);
    let without_ledger = dry_run_one(&f.fs, None, "net.ipv4.tcp_fin_timeout", "30");
    assert_eq!(without_ledger.original, None);
}

#[test]
fn restore_puts_originals_back_and_empties_the_ledger() {
    let mut f = fixture();
    apply_all(
        &f.fs,
        &mut f.ledger,
        [
            ("net.ipv4.tcp_fin_timeout", "30"),
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("kernel.shmmax", "134217728"),
        ],
        None,
    );
    // someone else already put fin_timeout back
    fs::write(f.fs.root.join("net/ipv4/tcp_fin_timeout"), "60\n").unwrap();
    let results = restore_all(&f.fs, &mut f.ledger);
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r.state == KeyState::Restored),
        "{results:?}"
    );
    let fin = results
        .iter()
        .find(|r| r.key == "net.ipv4.tcp_fin_timeout")
        .unwrap();
    assert!(!fin.changed);
    assert_eq!(file(&f, "net/ipv4/ip_local_port_range"), "32768\t60999\n");
    assert_eq!(file(&f, "kernel/shmmax"), "18446744073709551615\n");
    assert!(f.ledger.is_empty());
    assert!(restore_key(&f.fs, &mut f.ledger, &key("kernel.shmmax")).is_none());
}

#[test]
fn restore_drops_keys_that_no_longer_exist() {
    let mut f = fixture();
    apply_one(
        &f.fs,
        &mut f.ledger,
        "net.ipv4.conf.eth0/100.rp_filter",
        "2",
        None,
    );
    fs::remove_dir_all(f.fs.root.join("net/ipv4/conf/eth0.100")).unwrap();
    let r = restore_key(
        &f.fs,
        &mut f.ledger,
        &key("net/ipv4/conf/eth0.100/rp_filter"),
    )
    .unwrap();
    assert_eq!(r.state, KeyState::Unsupported);
    assert!(r.message.unwrap().contains("dropped from the ledger"));
    assert!(f.ledger.is_empty());
}

#[test]
fn failed_restore_keeps_the_entry() {
    let mut f = fixture();
    symlink("/dev/null", f.fs.root.join("net/ipv4/black_hole")).unwrap();
    // record an original the black hole will never report back
    f.ledger
        .record_original(&key("net.ipv4.black_hole"), "7", None)
        .unwrap();
    let r = restore_key(&f.fs, &mut f.ledger, &key("net.ipv4.black_hole")).unwrap();
    assert_eq!(r.state, KeyState::Failed);
    assert_eq!(f.ledger.len(), 1);
}

#[test]
fn key_result_serialises_camel_case() {
    let mut f = fixture();
    let r = apply_one(&f.fs, &mut f.ledger, "net.ipv4.tcp_fin_timeout", "30", None);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["key"], "net.ipv4.tcp_fin_timeout");
    assert_eq!(json["scope"], "NetworkNamespace");
    assert_eq!(json["state"], "Applied");
    assert_eq!(json["changed"], true);
    assert_eq!(json["previous"], "60");
    let back: KeyResult = serde_json::from_value(json).unwrap();
    assert_eq!(back, r);
}

/// Writes a ledger by hand, as an attacker with write access to the state file would.
fn forge_ledger(f: &mut Fixture, entries: &[(&str, &str)]) {
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|(k, v)| {
            serde_json::json!({"key": k, "original": v, "scope": "Node", "firstChangedUnix": 1})
        })
        .collect();
    let text = serde_json::json!({"version": 1, "entries": entries}).to_string();
    // Reopen: the fixture's ledger holds the lock.
    let state = f.state.clone();
    f.ledger = Ledger::load(tempfile::tempdir().unwrap().keep())
        .unwrap()
        .ledger;
    fs::write(state.join("ledger.json"), text).unwrap();
    f.ledger = Ledger::load(&state).unwrap().ledger;
}

/// Defect 1: restore does not trust the ledger. A denied key, a value with a newline, or a
/// weakening value is refused, reported and kept; the good entry is restored.
#[test]
fn restore_refuses_forged_entries_and_keeps_them() {
    let mut f = fixture();
    forge_ledger(
        &mut f,
        &[
            ("kernel.core_pattern", "|/tmp/evil %p"),
            (
                "net.ipv4.tcp_syncookies",
                "0\nkernel.core_pattern=|/tmp/evil",
            ),
            ("net.ipv4.tcp_fin_timeout", "45"),
        ],
    );
    let results = restore_all(&f.fs, &mut f.ledger);
    let by_key: BTreeMap<&str, &KeyResult> = results.iter().map(|r| (r.key.as_str(), r)).collect();
    let core = by_key["kernel.core_pattern"];
    assert_eq!(core.state, KeyState::Denied, "{core:?}");
    assert!(
        core.message.as_deref().unwrap().contains("kept"),
        "{core:?}"
    );
    assert_eq!(file(&f, "kernel/core_pattern"), "core\n", "never written");
    let cookies = by_key["net.ipv4.tcp_syncookies"];
    assert_eq!(cookies.state, KeyState::Invalid, "{cookies:?}");
    assert_eq!(file(&f, "net/ipv4/tcp_syncookies"), "1\n");
    assert_eq!(by_key["net.ipv4.tcp_fin_timeout"].state, KeyState::Restored);
    assert_eq!(file(&f, "net/ipv4/tcp_fin_timeout"), "45\n");
    let kept: Vec<String> = f.ledger.entries().map(|e| e.key.dotted()).collect();
    assert_eq!(kept, ["kernel.core_pattern", "net.ipv4.tcp_syncookies"]);
}

/// The cluster policy holds for restores too: a key it denies is not written back.
#[test]
fn restore_obeys_the_cluster_policy() {
    let mut f = fixture();
    apply_one(&f.fs, &mut f.ledger, "kernel.shmmax", "1024", None);
    let policy = crate::sysctl::SysctlPolicy::parse("allowedScopes: [NetworkNamespace]")
        .unwrap()
        .compile()
        .unwrap();
    let r = super::restore_key(&f.fs, &mut f.ledger, &key("kernel.shmmax"), &policy).unwrap();
    assert_eq!(r.state, KeyState::Denied);
    assert!(
        r.message.as_deref().unwrap().contains("allowedScopes"),
        "{r:?}"
    );
    assert_eq!(file(&f, "kernel/shmmax"), "1024\n");
    assert_eq!(f.ledger.len(), 1);
}

/// Optional keys: missing is Unsupported but not a failure; the marker does not reach the
/// kernel path.
#[test]
fn optional_missing_key_is_no_failure() {
    let mut f = fixture();
    let r = apply_one(&f.fs, &mut f.ledger, "-net.ipv4.tcp_tw_recycle", "1", None);
    assert_eq!(r.state, KeyState::Unsupported);
    assert!(r.optional);
    assert_eq!(r.key, "net.ipv4.tcp_tw_recycle");
    assert!(!r.is_failure());
    let r = apply_one(&f.fs, &mut f.ledger, "net.ipv4.tcp_tw_recycle", "1", None);
    assert!(r.is_failure());
    let r = apply_one(
        &f.fs,
        &mut f.ledger,
        "-net.ipv4.tcp_fin_timeout",
        "31",
        None,
    );
    assert_eq!(r.state, KeyState::Applied);
    assert_eq!(file(&f, "net/ipv4/tcp_fin_timeout"), "31\n");
    // an optional key's bad value is still a failure
    let r = apply_one(&f.fs, &mut f.ledger, "-net.ipv4.tcp_fin_timeout", "", None);
    assert!(r.is_failure());
}

/// Defect 5: restoring many keys rewrites the ledger once, not once per key (20k keys took
/// 217 s when each restore rewrote and fsynced the whole ledger).
#[test]
fn restoring_many_keys_rewrites_the_ledger_once() {
    let mut f = fixture();
    for i in 0..50 {
        let p = f.fs.root.join(format!("net/ipv4/k{i}"));
        fs::write(&p, "1\n").unwrap();
        apply_one(&f.fs, &mut f.ledger, &format!("net.ipv4.k{i}"), "2", None);
    }
    let before = f.ledger.rewrites();
    let results = restore_all(&f.fs, &mut f.ledger);
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|r| r.state == KeyState::Restored));
    assert_eq!(f.ledger.rewrites() - before, 1);
    assert!(f.ledger.is_empty());
}
