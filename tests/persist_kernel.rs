//! Issue 19, persistence and contested keys, against the real kernel in a fresh network
//! namespace (real `net.*` keys, a fake host root for the sysctl.d file):
//!
//! * a `persist: true` profile's keys land in `<host>/etc/sysctl.d/99-zz-nodetune.conf`, the
//!   file follows an edit, survives the state a SIGKILL between the sysctl write and the file
//!   write leaves (kernel written, file stale, a half-written temporary file) and goes with the
//!   profile, while the original comes back;
//! * a second writer resetting a key from another thread makes it `Contested` with the
//!   foreign value, and the agent writes it fewer times than it was changed.
//!
//! Root only; the helper refuses to run outside the namespace it was started in, and writes
//! `net.*` keys only.
mod kernel;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kernel::{root_or_skip, run, run_helper_in_fresh_netns};
use nodetune::agent::contest::ContestLimits;
use nodetune::agent::persist::{DIR, FILE_NAME};
use nodetune::agent::tuner::Tuner;
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningProfileSpec};
use nodetune::sysctl::{Ledger, SysctlFs};

const HELPER_ENV: &str = "NODETUNE_PERSIST_NETNS_HELPER";
const HELPER_PASSED: &str = "persist netns helper passed";
const FIN: &str = "net.ipv4.tcp_fin_timeout";

#[test]
fn persisted_keys_follow_the_profile_and_a_kill_is_repaired_in_fresh_netns() {
    if root_or_skip("persisted_keys_follow_the_profile_and_a_kill_is_repaired_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "persist");
    }
}

#[test]
fn a_key_a_second_writer_keeps_resetting_is_contested_in_fresh_netns() {
    if root_or_skip("a_key_a_second_writer_keeps_resetting_is_contested_in_fresh_netns") {
        run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "contest");
    }
}

fn sysctl_n(key: &str) -> String {
    run(Command::new("sysctl").args(["-n", key]))
        .trim()
        .to_owned()
}

fn profile(value: &str, persist: bool) -> NodeTuningProfile {
    NodeTuningProfile::new(
        "web",
        NodeTuningProfileSpec {
            sysctls: [(FIN.into(), value.into())].into(),
            restore_on_removal: true,
            persist,
            ..Default::default()
        },
    )
}

fn pass(tuner: &mut Tuner, ledger: &mut Ledger, p: Option<&NodeTuningProfile>) -> Vec<KeyState> {
    let fs = SysctlFs::default();
    let merged = nodetune::plan::merge(p);
    let all: Vec<&NodeTuningProfile> = p.into_iter().collect();
    let out = tuner.pass(&fs, ledger, &merged, &all);
    assert!(
        out.warnings.iter().all(|w| !w.starts_with("persist")),
        "{:?}",
        out.warnings
    );
    out.results.iter().map(|r| r.state).collect()
}

fn persist_mode(host: &Path, state: &Path) {
    let file = host.join(DIR).join(FILE_NAME);
    let boot_value = sysctl_n(FIN);
    assert_ne!(boot_value, "30");
    let mut ledger = Ledger::load(state).expect("ledger").ledger;
    let mut tuner = Tuner::default().persisting_to(host.into());

    let states = pass(&mut tuner, &mut ledger, Some(&profile("30", true)));
    assert_eq!(states, [KeyState::Applied]);
    assert_eq!(sysctl_n(FIN), "30");
    let text = std::fs::read_to_string(&file).expect("the file is written");
    assert!(text.contains(&format!("-{FIN} = 30\n")), "{text}");

    pass(&mut tuner, &mut ledger, Some(&profile("25", true)));
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(
        text.contains(&format!("-{FIN} = 25\n")),
        "follows the edit: {text}"
    );

    // SIGKILL after the kernel write of 20, before the file write: a fresh agent finds the
    // kernel at 20, the file at 25 and a half-written temporary file.
    drop((tuner, ledger));
    run(Command::new("sysctl").args(["-q", "-w", &format!("{FIN}=20")]));
    std::fs::write(
        host.join(DIR).join(".99-zz-nodetune.conf.tmp"),
        "-net.ipv4.tcp",
    )
    .expect("w");
    let mut ledger = Ledger::load(state).expect("ledger").ledger;
    let mut tuner = Tuner::default().persisting_to(host.into());
    pass(&mut tuner, &mut ledger, Some(&profile("20", true)));
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(text.contains(&format!("-{FIN} = 20\n")), "repaired: {text}");
    let names: Vec<String> = std::fs::read_dir(host.join(DIR))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [FILE_NAME], "no temporary file left");

    pass(&mut tuner, &mut ledger, None);
    assert!(!file.exists(), "removed with the profile");
    assert_eq!(sysctl_n(FIN), boot_value, "the original is back");
    assert!(ledger.persisted().is_empty());
}

fn contest_mode(state: &Path) {
    let mut ledger = Ledger::load(state).expect("ledger").ledger;
    let mut tuner = Tuner::default().contest_limits(ContestLimits {
        threshold: 3,
        window: Duration::from_secs(3600),
        max_backoff: Duration::from_secs(600),
    });
    let p = profile("30", false);
    pass(&mut tuner, &mut ledger, Some(&p));
    let stop = Arc::new(AtomicBool::new(false));
    let foreign = Arc::new(AtomicU64::new(0));
    // The second writer: sets 61 every 10 ms, whatever it finds.
    let writer = {
        let (stop, foreign) = (stop.clone(), foreign.clone());
        std::thread::spawn(move || {
            let fs = SysctlFs::default();
            let key = nodetune::sysctl::SysctlKey::parse(FIN).expect("key");
            while !stop.load(Ordering::SeqCst) {
                fs.write(&key, "61").expect("the second writer");
                foreign.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (mut found_changed, mut ours) = (0u64, 0u64);
    let mut last = Vec::new();
    for _ in 0..30 {
        // Each pass after a write of the other writer: every pass finds the key changed.
        let before = foreign.load(Ordering::SeqCst);
        while foreign.load(Ordering::SeqCst) == before || sysctl_n(FIN) != "61" {
            std::thread::sleep(Duration::from_millis(2));
        }
        found_changed += 1;
        let drift_before = tuner.drift_corrections;
        last = pass(&mut tuner, &mut ledger, Some(&p));
        ours += tuner.drift_corrections - drift_before;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert_eq!(last, [KeyState::Contested]);
    let mut status = nodetune::api::NodeTuningReportStatus::default();
    tuner.annotate(&mut status);
    let c = status.contested.first().expect("contested");
    assert_eq!((c.key.as_str(), c.foreign_value.as_str()), (FIN, "61"));
    assert!(c.corrections > 3, "{c:?}");
    assert!(
        ours < found_changed,
        "{ours} corrections written for {found_changed} passes that found the key changed \
         ({} foreign writes)",
        foreign.load(Ordering::SeqCst)
    );
    println!(
        "contest: {ours} corrections for {found_changed} changes found, {} foreign writes",
        foreign.load(Ordering::SeqCst)
    );
}

/// Not a test of its own: the body run inside the fresh namespace by the tests above.
#[test]
#[ignore = "helper: runs only inside the network namespace the tests above create"]
fn netns_helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        eprintln!("netns_helper does nothing unless {HELPER_ENV} is set by a parent test");
        return;
    };
    kernel::assert_fresh_netns();
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let host = dir.path().join("host");
    std::fs::create_dir_all(host.join(DIR)).expect("host sysctl.d");
    match mode.as_str() {
        "persist" => persist_mode(&host, &state),
        "contest" => contest_mode(&state),
        other => panic!("unknown mode {other}"),
    }
    println!("{HELPER_PASSED}: {mode}");
}
