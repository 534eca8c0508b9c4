//! Issue 19, reboots and boot-time configuration, against the real kernel.
//!
//! * A simulated reboot in a fresh network namespace (a fake boot id file; the real `net.*`
//!   keys of the namespace set back to "boot values", one of them a value the node's admin
//!   changed since the first boot): the agent's own steps (`HostWatch::before_pass`, then the
//!   tuner's pass) count no drift, and the restore puts back the admin's value, not the stale
//!   original of the first boot. Root only; the helper refuses to run outside the namespace
//!   it was started in, and writes `net.*` keys only.
//! * `nodetune plan --host-root DIR` names the file and line of a boot-time setting that
//!   differs, a glob included. Read-only: plan writes nothing.
mod kernel;

use std::path::Path;
use std::process::Command;

use kernel::{root_or_skip, run, run_helper_in_fresh_netns};
use nodetune::agent::host::HostWatch;
use nodetune::agent::tuner::Tuner;
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningProfileSpec};
use nodetune::sysctl::{Ledger, SysctlFs, SysctlKey};

const HELPER_ENV: &str = "NODETUNE_BOOT_NETNS_HELPER";
const HELPER_PASSED: &str = "boot netns helper passed";
const BIN: &str = env!("CARGO_BIN_EXE_nodetune");

const BOOT_A: &str = "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10";
const BOOT_B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
const FIN: &str = "net.ipv4.tcp_fin_timeout";
const KEEPALIVE: &str = "net.ipv4.tcp_keepalive_probes";

#[test]
fn a_reboot_rebases_the_originals_and_counts_no_drift_in_fresh_netns() {
    if root_or_skip("a_reboot_rebases_the_originals_and_counts_no_drift_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "reboot");
    }
}

fn sysctl_n(key: &str) -> String {
    run(Command::new("sysctl").args(["-n", key]))
        .trim()
        .to_owned()
}

fn sysctl_w(key: &str, value: &str) {
    run(Command::new("sysctl").args(["-q", "-w", &format!("{key}={value}")]));
}

fn web() -> NodeTuningProfile {
    NodeTuningProfile::new(
        "web",
        NodeTuningProfileSpec {
            sysctls: [(FIN.into(), "30".into()), (KEEPALIVE.into(), "5".into())].into(),
            restore_on_removal: true,
            ..Default::default()
        },
    )
}

/// The agent's steps of one pass (before_pass, then the tuner), as `NodeSide::pass` runs them.
fn agent_pass(
    host: &mut HostWatch,
    tuner: &mut Tuner,
    ledger: &mut Ledger,
    profiles: &[&NodeTuningProfile],
) -> (bool, nodetune::agent::tuner::PassOutcome) {
    let fs = SysctlFs::default();
    let rebooted = host.before_pass(&fs, ledger).expect("ledger usable");
    if rebooted {
        tuner.forget_verified();
    }
    let merged = nodetune::plan::merge(profiles.iter().copied());
    let every = web();
    let out = tuner.pass(&fs, ledger, &merged, &[&every]);
    (rebooted, out)
}

fn reboot_mode(boot_file: &Path, state: &Path) {
    let (fin_default, keepalive_default) = (sysctl_n(FIN), sysctl_n(KEEPALIVE));
    assert_ne!(fin_default, "30");
    std::fs::write(boot_file, format!("{BOOT_A}\n")).expect("boot id");
    let mut ledger = Ledger::load(state).expect("ledger").ledger;
    let mut host = HostWatch::new(boot_file.to_owned(), state.join("no-host-root"));
    let mut tuner = Tuner::default();
    let p = web();

    let (rebooted, out) = agent_pass(&mut host, &mut tuner, &mut ledger, &[&p]);
    assert!(!rebooted);
    assert!(
        out.results.iter().all(|r| r.state == KeyState::Applied),
        "{:?}",
        out.results
    );
    assert_eq!(
        (sysctl_n(FIN).as_str(), sysctl_n(KEEPALIVE).as_str()),
        ("30", "5")
    );

    // The reboot: a new boot id, every key back at its boot value, and the admin's boot
    // configuration now setting fin_timeout to 45 (keepalive keeps the kernel default).
    std::fs::write(boot_file, format!("{BOOT_B}\n")).expect("boot id");
    sysctl_w(FIN, "45");
    sysctl_w(KEEPALIVE, &keepalive_default);
    let (rebooted, out) = agent_pass(&mut host, &mut tuner, &mut ledger, &[&p]);
    assert!(rebooted);
    assert_eq!(
        out.drifted, 0,
        "the first application after a reboot is no drift"
    );
    assert_eq!(tuner.drift_corrections, 0);
    assert_eq!(sysctl_n(FIN), "30");
    assert_eq!(ledger.boot_id(), Some(BOOT_B));
    let fin = SysctlKey::parse(FIN).expect("key");
    assert_eq!(ledger.get(&fin).expect("held").original, "45");

    // Drift in the same boot is still drift.
    sysctl_w(FIN, "44");
    let (_, out) = agent_pass(&mut host, &mut tuner, &mut ledger, &[&p]);
    assert_eq!(out.drifted, 1);

    // The profile goes: this boot's values come back, the admin's 45 and not the stale default.
    let (_, out) = agent_pass(&mut host, &mut tuner, &mut ledger, &[]);
    assert!(
        out.restored.iter().all(|r| r.state == KeyState::Restored),
        "{:?}",
        out.restored
    );
    assert_eq!(sysctl_n(FIN), "45", "not the first boot's {fin_default}");
    assert_eq!(sysctl_n(KEEPALIVE), keepalive_default);
    assert!(ledger.is_empty());
}

/// Not a test of its own: the body run inside the fresh namespace by the test above.
#[test]
#[ignore = "helper: runs only inside the network namespace the tests above create"]
fn netns_helper() {
    let Some(mode) = kernel::helper_mode(HELPER_ENV) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    match mode.as_str() {
        "reboot" => reboot_mode(&dir.path().join("boot_id"), &state),
        other => panic!("unknown mode {other}"),
    }
    println!("{HELPER_PASSED}: {mode}");
}

/// `nodetune plan --host-root DIR`: the boot-time setting that differs is named with file and
/// line, in the table and in JSON, through a glob too; a masked file is not.
#[test]
fn plan_with_host_root_names_file_and_line() {
    let root = tempfile::tempdir().expect("tmp");
    let d = root.path().join("etc/sysctl.d");
    std::fs::create_dir_all(&d).expect("mkdir");
    let usr = root.path().join("usr/lib/sysctl.d");
    std::fs::create_dir_all(&usr).expect("mkdir");
    std::fs::write(
        d.join("10-net.conf"),
        "# tuned by hand\n\nnet.ipv4.tcp_fin_timeout = 15\n",
    )
    .expect("write");
    std::fs::write(usr.join("50-rp.conf"), "-net.ipv4.conf.*.rp_filter = 2\n").expect("write");
    std::fs::write(
        usr.join("60-masked.conf"),
        "net.ipv4.tcp_keepalive_probes = 1\n",
    )
    .expect("write");
    std::os::unix::fs::symlink("/dev/null", d.join("60-masked.conf")).expect("ln");
    let profile = root.path().join("p.yaml");
    std::fs::write(
        &profile,
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: web}\n\
         spec:\n  sysctls:\n    net.ipv4.tcp_fin_timeout: \"30\"\n    net.ipv4.conf.all.rp_filter: \"1\"\n    \
         net.ipv4.tcp_keepalive_probes: \"5\"\n",
    )
    .expect("write");
    let plan = |extra: &[&str]| {
        let out = Command::new(BIN)
            .arg("plan")
            .arg("-f")
            .arg(&profile)
            .arg("--host-root")
            .arg(root.path())
            .args(extra)
            .output()
            .expect("run nodetune");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = plan(&[]);
    assert!(
        table.contains("host config: net.ipv4.tcp_fin_timeout = 15 at /etc/sysctl.d/10-net.conf:3"),
        "{table}"
    );
    assert!(
        table.contains(
            "net.ipv4.conf.all.rp_filter = 2 at /usr/lib/sysctl.d/50-rp.conf:1 (glob net.ipv4.conf.*.rp_filter)"
        ),
        "{table}"
    );
    assert!(!table.contains("keepalive_probes = 1"), "masked: {table}");
    let doc: serde_json::Value = serde_json::from_str(&plan(&["-o", "json"])).expect("json");
    let diffs = doc["hostConfig"]["differences"]
        .as_array()
        .expect("differences");
    assert_eq!(diffs.len(), 2, "{doc}");
    let fin = diffs
        .iter()
        .find(|d| d["key"] == "net.ipv4.tcp_fin_timeout")
        .expect("fin");
    assert_eq!(
        (fin["file"].as_str(), fin["line"].as_u64()),
        (Some("/etc/sysctl.d/10-net.conf"), Some(3))
    );
    let missing = Command::new(BIN)
        .args(["plan", "-f"])
        .arg(&profile)
        .arg("--host-root")
        .arg(root.path().join("nope"))
        .output()
        .expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such directory"));
}
