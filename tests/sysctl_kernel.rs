//! Kernel tests for the sysctl engine: the library against the real `/proc/sys` of a fresh
//! network namespace, checked with `sysctl -n` in the same namespace.
//!
//! Needs root (to create a network namespace); CI runs as root. Elsewhere these tests fail
//! with a message, unless `NODETUNE_SKIP_ROOT_TESTS=1` turns them into a printed skip.
//!
//! How: each test re-executes this test binary under `unshare --net`, selecting the ignored
//! `netns_helper` test and its mode through environment variables. Safety: the helper refuses
//! to run unless its network namespace differs from the parent's, and it only ever writes
//! network-namespaced (`net.*`) keys; the host's own sysctls are never written. The global keys
//! involved (`kernel.core_pattern`, `kernel.tainted`) are only read, to show that the policy
//! denial leaves them alone; `kernel.tainted` is offered the value 0, which adds no taint flag
//! even where the denial is missing. Rules on other global keys are exercised on a copy of
//! their files, never on the host's.

mod kernel;

use kernel::{root_or_skip, run, run_helper_in_fresh_netns};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nodetune::api::{KeyState, Scope};
use nodetune::sysctl::{KeyResult, Ledger, Policy, SysctlFs, SysctlKey, checks, value};

/// Selects the helper's mode; set only in the re-executed child.
const HELPER_ENV: &str = "NODETUNE_SYSCTL_NETNS_HELPER";
/// Printed by the helper at the end, so the parent knows it really ran.
const HELPER_PASSED: &str = "sysctl netns helper passed";

// ---------------------------------------------------------------------------------------------
// Tests run by `cargo test` (outside the namespace)

/// Valid keys applied, bad keys reported per key, then everything restored to the kernel
/// defaults and the ledger emptied.
#[test]
fn apply_then_restore_in_fresh_netns() {
    if root_or_skip("apply_then_restore_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "apply-restore");
    }
}

/// A corrupt ledger is moved aside and reported; the engine carries on with a fresh one.
#[test]
fn corrupt_ledger_is_set_aside_in_fresh_netns() {
    if root_or_skip("corrupt_ledger_is_set_aside_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "corrupt-ledger");
    }
}

/// Per-interface keys for an interface whose name contains a dot (a VLAN-style `eth0.100`),
/// in both spellings; restoring after the interface is gone drops the entries.
#[test]
fn interface_keys_with_dots_in_fresh_netns() {
    if root_or_skip("interface_keys_with_dots_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "interface");
    }
}

/// Defect 3: ENOENT from a *write* (the kernel's answer to an unknown congestion-control
/// algorithm) is the kernel refusing the value, not a missing key: restore keeps the original.
#[test]
fn enoent_from_a_write_keeps_the_original_in_fresh_netns() {
    if root_or_skip("enoent_from_a_write_keeps_the_original_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "enoent-write");
    }
}

/// Issue 17 item 1: the kernel's integer handlers read octal, hex and leading spaces; the number
/// nodetune judges ([`value::kernel_integer`]) is the number the kernel stores, form by form.
#[test]
fn kernel_reads_numbers_as_nodetune_judges_them() {
    if root_or_skip("kernel_reads_numbers_as_nodetune_judges_them") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "number-forms");
    }
}

/// Issue 17 item 8: `kernel.tainted` is refused before anything is written (the kernel only
/// ever adds taint flags).
#[test]
fn tainted_is_refused_in_fresh_netns() {
    if root_or_skip("tainted_is_refused_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "tainted");
    }
}

/// Issue 17 items 1 and 8: forged ledger entries for global keys under a rule, in forms the
/// kernel reads as weakening or one-way numbers, are refused and kept, and so are weakening
/// values of `fs.protected_fifos` and `fs.protected_regular`. On a copy of the files (these keys
/// are global: the host's must never be written by a test).
#[test]
fn forged_octal_and_hex_originals_are_not_restored() {
    let root = tempfile::tempdir().expect("tree");
    let state = tempfile::tempdir().expect("state");
    let fs = SysctlFs::new(root.path());
    for (key, now) in [
        ("vm.mmap_min_addr", "65536"),
        ("kernel.yama.ptrace_scope", "1"),
        ("kernel.unprivileged_bpf_disabled", "2"),
        ("fs.protected_fifos", "1"),
        ("fs.protected_regular", "2"),
    ] {
        let path = fs.path_of(&SysctlKey::parse(key).unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{now}\n")).unwrap();
    }
    let entry = |key: &str, original: &str| {
        format!(
            r#"{{"key": "{key}", "original": "{original}", "scope": "Node", "firstChangedUnix": 1}}"#
        )
    };
    let forged = [
        entry("vm.mmap_min_addr", "0100000"),
        entry("kernel.yama.ptrace_scope", "0x3"),
        entry("kernel.unprivileged_bpf_disabled", "0x1"),
    ];
    let text = format!(r#"{{"version": 1, "entries": [{}]}}"#, forged.join(", "));
    std::fs::write(state.path().join("ledger.json"), text).unwrap();
    let mut ledger = Ledger::load(state.path()).expect("load").ledger;
    // Opted in to every weakening there is: the forms are still refused.
    let policy = nodetune::sysctl::SysctlPolicy::parse(
        "allowWeakening: [vm.mmap_min_addr, kernel.yama.ptrace_scope, kernel.unprivileged_bpf_disabled]",
    )
    .unwrap()
    .compile()
    .unwrap();
    for r in nodetune::sysctl::restore_all(&fs, &mut ledger, &policy) {
        assert_eq!(r.state, KeyState::Denied, "{r:?}");
    }
    assert_eq!(ledger.len(), 3, "refused entries are kept");
    assert_eq!(
        fs.read(&SysctlKey::parse("vm.mmap_min_addr").unwrap())
            .unwrap(),
        "65536"
    );
    assert_eq!(
        fs.read(&SysctlKey::parse("kernel.yama.ptrace_scope").unwrap())
            .unwrap(),
        "1"
    );
    for key in ["fs.protected_fifos", "fs.protected_regular"] {
        let before = fs.read(&SysctlKey::parse(key).unwrap()).unwrap();
        let r = apply_one(&fs, &mut ledger, key, "0", Some("p"));
        assert_eq!(r.state, KeyState::Denied, "{r:?}");
        assert!(
            r.message
                .as_deref()
                .unwrap_or("")
                .contains("allowWeakening"),
            "{r:?}"
        );
        assert_eq!(fs.read(&SysctlKey::parse(key).unwrap()).unwrap(), before);
    }
}

/// Not a test of its own: the body run inside the fresh namespace by the tests above.
#[test]
#[ignore = "helper: runs only inside the network namespace the tests above create"]
fn netns_helper() {
    let Some(mode) = kernel::helper_mode(HELPER_ENV) else {
        return;
    };
    let state = tempfile::tempdir().expect("state dir");
    match mode.as_str() {
        "apply-restore" => apply_restore(state.path()),
        "corrupt-ledger" => corrupt_ledger(state.path()),
        "interface" => interface(state.path()),
        "enoent-write" => enoent_write(state.path()),
        "number-forms" => number_forms(),
        "tainted" => tainted(state.path()),
        other => panic!("unknown helper mode {other:?}"),
    }
    println!("{HELPER_PASSED}: {mode}");
}

// ---------------------------------------------------------------------------------------------
// Bodies run inside the namespace

const FIN: &str = "net.ipv4.tcp_fin_timeout";
const RANGE: &str = "net.ipv4.ip_local_port_range";
const RECYCLE: &str = "net.ipv4.tcp_tw_recycle";
const SYNCOOKIES: &str = "net.ipv4.tcp_syncookies";
const KEEPALIVE: &str = "net.ipv4.tcp_keepalive_time";
const CORE_PATTERN: &str = "kernel.core_pattern";

fn apply_restore(state: &Path) {
    let fs = SysctlFs::default();
    let defaults: BTreeMap<&str, String> = [FIN, RANGE, SYNCOOKIES, KEEPALIVE]
        .into_iter()
        .map(|k| (k, sysctl_n(k)))
        .collect();
    let core_pattern = sysctl_n(CORE_PATTERN);

    let loaded = Ledger::load(state).expect("load ledger");
    assert!(loaded.set_aside.is_none());
    let mut ledger = loaded.ledger;

    let desired = BTreeMap::from([
        (FIN, "30"),
        (RANGE, "1024 65000"),
        (RECYCLE, "1"),
        (SYNCOOKIES, "abc"),
        // The kernel parses 0x4b0 as 1200 and prints "1200": a real read-back mismatch.
        (KEEPALIVE, "0x4b0"),
        (CORE_PATTERN, "|/bin/false"),
    ]);
    for k in desired.keys().filter(|k| k.starts_with("net.")) {
        let scope = SysctlKey::parse(k).unwrap().scope();
        assert_eq!(
            scope,
            Scope::NetworkNamespace,
            "only netns keys are written"
        );
    }

    let warnings = checks::check(&desired, None);
    assert!(warnings.iter().any(|w| w.key == RECYCLE), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.key == RANGE), "{warnings:?}");

    let results = apply_all(&fs, &mut ledger, &desired, Some("kernel-test"));
    let by_key = by_key(&results);
    assert_eq!(results.len(), desired.len());

    let fin = by_key[FIN];
    assert_eq!(
        (fin.state, fin.changed),
        (KeyState::Applied, true),
        "{fin:?}"
    );
    assert_eq!(fin.original.as_deref(), Some(defaults[FIN].as_str()));
    let range = by_key[RANGE];
    assert_eq!(range.state, KeyState::Applied, "{range:?}");
    assert_eq!(
        range.actual.as_deref(),
        Some("1024\t65000"),
        "kernel prints a tab"
    );

    let recycle = by_key[RECYCLE];
    assert_eq!(recycle.state, KeyState::Unsupported, "{recycle:?}");
    assert!(recycle.message.as_deref().unwrap().contains("4.12"));

    let cookies = by_key[SYNCOOKIES];
    assert_eq!(cookies.state, KeyState::Invalid, "{cookies:?}");
    assert!(!cookies.changed);
    assert_eq!(
        cookies.original, None,
        "kernel unchanged, ledger entry removed again"
    );

    let keepalive = by_key[KEEPALIVE];
    assert_eq!(keepalive.state, KeyState::Failed, "{keepalive:?}");
    assert_eq!(keepalive.actual.as_deref(), Some("1200"));
    let msg = keepalive.message.as_deref().unwrap();
    assert!(msg.contains("0x4b0") && msg.contains("1200"), "{msg}");

    let core = by_key[CORE_PATTERN];
    assert_eq!(core.state, KeyState::Denied, "{core:?}");
    assert_eq!(sysctl_n(CORE_PATTERN), core_pattern, "denied key untouched");

    // the kernel, seen by sysctl(8) in the same namespace
    assert_eq!(sysctl_n(FIN), "30");
    assert!(value::same(&sysctl_n(RANGE), "1024 65000"));
    assert_eq!(sysctl_n(SYNCOOKIES), defaults[SYNCOOKIES]);
    assert_eq!(sysctl_n(KEEPALIVE), "1200");

    // the ledger on disk holds exactly the keys whose kernel value changed
    assert_eq!(
        ledger_keys_on_disk(state),
        [RANGE, FIN, KEEPALIVE].map(String::from),
        "sorted by path"
    );
    let on_disk = ledger_json(state);
    let entry = on_disk["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == RANGE)
        .unwrap();
    assert_eq!(entry["original"], defaults[RANGE].as_str());
    assert_eq!(entry["profile"], "kernel-test");
    assert_eq!(entry["scope"], "NetworkNamespace");

    // applying again changes nothing and keeps the first originals
    let again = apply_all(
        &fs,
        &mut ledger,
        [(FIN, "30"), (RANGE, "1024\t65000")],
        None,
    );
    assert!(
        again
            .iter()
            .all(|r| r.state == KeyState::Applied && !r.changed),
        "{again:?}"
    );
    assert_eq!(
        ledger
            .get(&SysctlKey::parse(FIN).unwrap())
            .unwrap()
            .original,
        defaults[FIN]
    );

    let restored = restore_all(&fs, &mut ledger);
    assert_eq!(restored.len(), 3, "{restored:?}");
    assert!(
        restored
            .iter()
            .all(|r| r.state == KeyState::Restored && r.changed),
        "{restored:?}"
    );
    for (k, v) in &defaults {
        assert!(value::same(&sysctl_n(k), v), "{k} back to {v:?}");
    }
    assert!(ledger.is_empty());
    assert!(ledger_keys_on_disk(state).is_empty());
}

fn corrupt_ledger(state: &Path) {
    let garbage = "{\"version\": 1, \"entries\": [ {\"key\": \"net.ipv4.tcp_fin_ti";
    std::fs::write(state.join("ledger.json"), garbage).unwrap();

    let loaded = Ledger::load(state).expect("a corrupt ledger is not an error");
    let aside = loaded.set_aside.expect("the corrupt ledger is reported");
    assert_eq!(std::fs::read_to_string(&aside.moved_to).unwrap(), garbage);
    assert!(
        aside
            .moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ledger.json.corrupt-")
    );
    let mut ledger = loaded.ledger;
    assert!(ledger.is_empty());

    let fs = SysctlFs::default();
    let default = sysctl_n(FIN);
    let r = apply_one(&fs, &mut ledger, FIN, "45", None);
    assert_eq!(r.state, KeyState::Applied, "{r:?}");
    assert_eq!(ledger_keys_on_disk(state), [FIN.to_string()]);
    let restored = restore_all(&fs, &mut ledger);
    assert_eq!(restored[0].state, KeyState::Restored, "{restored:?}");
    assert_eq!(sysctl_n(FIN), default);
    assert!(
        aside.moved_to.exists(),
        "the corrupt file is kept for inspection"
    );
}

fn interface(state: &Path) {
    run(Command::new("ip").args([
        "link", "add", "eth0.100", "type", "veth", "peer", "name", "p0",
    ]));
    let fs = SysctlFs::default();
    let mut ledger = Ledger::load(state).expect("load ledger").ledger;
    let rp = "net.ipv4.conf.eth0/100.rp_filter"; // sysctl(8) dotted spelling
    let arp = "net/ipv4/conf/eth0.100/arp_ignore"; // slash spelling
    let rp_default = sysctl_n(rp);
    let arp_default = std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0.100/arp_ignore")
        .expect("per-interface key of eth0.100");

    let results = apply_all(
        &fs,
        &mut ledger,
        [(rp, "2"), (arp, "1"), ("net.ipv4.conf.eth9.rp_filter", "1")],
        None,
    );
    assert_eq!(results[0].state, KeyState::Applied, "{results:?}");
    assert_eq!(results[1].state, KeyState::Applied, "{results:?}");
    assert_eq!(
        results[1].key, "net.ipv4.conf.eth0/100.arp_ignore",
        "canonical form"
    );
    assert_eq!(results[2].state, KeyState::Unsupported);
    assert!(results[2].message.as_deref().unwrap().contains("interface"));
    assert_eq!(sysctl_n(rp), "2");
    assert_eq!(sysctl_n("net.ipv4.conf.eth0/100.arp_ignore"), "1");

    // restore while the interface exists puts the defaults back
    let r = restore_key(&fs, &mut ledger, &SysctlKey::parse(rp).unwrap()).unwrap();
    assert_eq!(r.state, KeyState::Restored, "{r:?}");
    assert_eq!(sysctl_n(rp), rp_default);

    // once the interface is gone there is nothing to restore: the entry is dropped
    run(Command::new("ip").args(["link", "del", "eth0.100"]));
    let restored = restore_all(&fs, &mut ledger);
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].state, KeyState::Unsupported, "{restored:?}");
    assert!(
        restored[0]
            .message
            .as_deref()
            .unwrap()
            .contains("dropped from the ledger")
    );
    assert!(ledger.is_empty());
    assert!(ledger_keys_on_disk(state).is_empty());
    assert!(!arp_default.is_empty());
}

fn enoent_write(state: &Path) {
    const CC: &str = "net.ipv4.tcp_congestion_control";
    let fs = SysctlFs::default();
    let before = sysctl_n(CC);
    let text = format!(
        r#"{{"version": 1, "entries": [{{"key": "{CC}", "original": "nosuchalgo", "scope": "NetworkNamespace", "firstChangedUnix": 1}}]}}"#
    );
    std::fs::write(state.join("ledger.json"), text).unwrap();
    let mut ledger = Ledger::load(state).expect("load").ledger;
    let restored = restore_all(&fs, &mut ledger);
    assert_eq!(restored[0].state, KeyState::Invalid, "{restored:?}");
    assert_eq!(ledger.len(), 1, "the original is kept for a later attempt");
    assert_eq!(ledger_keys_on_disk(state), [CC.to_string()]);
    assert_eq!(sysctl_n(CC), before);
}

/// Every form written to two integer keys of this namespace; what the kernel stores (or
/// refuses) against [`value::kernel_integer`].
fn number_forms() {
    let fs = SysctlFs::default();
    let forms = [
        "0100000",
        "0x3",
        "0X1f",
        " 3",
        "\t3",
        "+3",
        "-3",
        "08",
        "0x",
        "0xg",
        "3 0",
        "3 x",
        "3x",
        "1e3",
        "-0",
        "00",
        "0",
        "017",
        "0x7f",
        "2147483648",
        "3\t",
        "0x 3",
        " +3",
        "- 3",
    ];
    let mut checked = 0;
    // somaxconn: proc_dointvec_minmax (0 and up); tcp_fin_timeout: proc_dointvec_jiffies.
    for key in ["net.core.somaxconn", "net.ipv4.tcp_fin_timeout"] {
        let k = SysctlKey::parse(key).unwrap();
        let before = fs.read(&k).expect("read");
        for form in forms {
            fs.write(&k, "100").expect("reset");
            let ours = value::kernel_integer(form);
            // A short write is an error to SysctlFs, yet the kernel kept the first number
            // ("3 0"): what counts is what it stores. No form here reads as 100.
            let _ = fs.write(&k, form);
            let stored: i128 = fs.read(&k).expect("read").trim().parse().expect("int");
            if stored != 100 {
                assert_eq!(
                    ours,
                    Some(stored),
                    "{key} <- {form:?}: the kernel stored {stored}"
                );
                checked += 1;
            } else {
                // Refused: nodetune may still read a number (judging it is harmless), but only
                // for a '+' sign (kstrto*-based handlers take it) or a number out of the
                // handler's range.
                assert!(
                    ours.is_none_or(|n| form.trim_start().starts_with('+')
                        || n < 0
                        || n > i128::from(i32::MAX)),
                    "{key} <- {form:?}: the kernel refused it, nodetune reads {ours:?}"
                );
            }
        }
        fs.write(&k, &before).expect("put back");
    }
    assert!(checked >= 20, "only {checked} forms accepted by the kernel");
}

fn tainted(state: &Path) {
    let fs = SysctlFs::default();
    let mut ledger = Ledger::load(state).expect("load").ledger;
    let before = sysctl_n("kernel.tainted");
    for key in ["kernel.tainted", "kernel/tainted"] {
        let r = apply_one(&fs, &mut ledger, key, "0", Some("p"));
        assert_eq!(r.state, KeyState::Denied, "{r:?}");
        assert!(
            r.message.as_deref().unwrap_or("").contains("one-way"),
            "{r:?}"
        );
    }
    assert!(ledger.is_empty(), "nothing recorded");
    assert_eq!(sysctl_n("kernel.tainted"), before);
}

// ---------------------------------------------------------------------------------------------
// Helpers

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

fn apply_one(
    fs: &SysctlFs,
    ledger: &mut Ledger,
    key: &str,
    value: &str,
    profile: Option<&str>,
) -> KeyResult {
    nodetune::sysctl::apply_one(fs, ledger, key, value, profile, &Policy::default())
}

fn restore_key(fs: &SysctlFs, ledger: &mut Ledger, key: &SysctlKey) -> Option<KeyResult> {
    nodetune::sysctl::restore_key(fs, ledger, key, &Policy::default())
}

fn restore_all(fs: &SysctlFs, ledger: &mut Ledger) -> Vec<KeyResult> {
    nodetune::sysctl::restore_all(fs, ledger, &Policy::default())
}

fn by_key(results: &[KeyResult]) -> BTreeMap<&str, &KeyResult> {
    results.iter().map(|r| (r.key.as_str(), r)).collect()
}

fn ledger_json(state: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state.join("ledger.json")).expect("ledger.json");
    serde_json::from_str(&text).expect("ledger.json is JSON")
}

fn ledger_keys_on_disk(state: &Path) -> Vec<String> {
    ledger_json(state)["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["key"].as_str().expect("key").to_owned())
        .collect()
}

/// `sysctl -n KEY` in the current namespace, without the trailing newline.
fn sysctl_n(key: &str) -> String {
    run(Command::new("sysctl").args(["-n", key]))
        .trim_end_matches('\n')
        .to_owned()
}
