//! Plumbing shared by the kernel tests: root checks, running commands, and re-running the test
//! binary inside a fresh network namespace (`unshare --net`), so tests touch only namespaces
//! they create. Include with `mod kernel;`.
#![allow(dead_code)]

use std::process::Command;

/// The parent's network namespace (`net:[inode]`), passed to the helper so it can refuse to
/// run anywhere else.
pub const PARENT_NETNS_ENV: &str = "NODETUNE_TEST_PARENT_NETNS";

/// True when running as root. Otherwise fails the test, or prints a skip line and returns
/// false when `NODETUNE_SKIP_ROOT_TESTS=1`.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var("NODETUNE_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        println!("SKIP {test}: needs root (NODETUNE_SKIP_ROOT_TESTS=1)");
        return false;
    }
    panic!(
        "{test} needs root to create a network namespace (effective uid {euid}); \
         run as root, or set NODETUNE_SKIP_ROOT_TESTS=1 to skip"
    );
}

/// Runs a command to completion; panics with its output unless it succeeds. Returns stdout.
pub fn run(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (is it installed?)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// This process's network namespace, as `net:[inode]`.
pub fn netns_id() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .expect("read /proc/self/ns/net")
        .to_string_lossy()
        .into_owned()
}

/// Re-runs this test binary's ignored `netns_helper` test under `unshare --net`, with
/// `helper_env=mode`, and checks that it printed `"{passed}: {mode}"`.
pub fn run_helper_in_fresh_netns(helper_env: &str, passed: &str, mode: &str) {
    let stdout = run_test_in_fresh_netns("netns_helper", helper_env, mode);
    assert!(
        stdout.contains(&format!("{passed}: {mode}")),
        "the helper did not run:\n{stdout}"
    );
}

/// Re-runs this test binary's ignored test `name` under `unshare --net`, with
/// `helper_env=value` and the parent's namespace passed on; returns its stdout.
pub fn run_test_in_fresh_netns(name: &str, helper_env: &str, value: &str) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    run(Command::new("unshare")
        .arg("--net")
        .arg(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(helper_env, value)
        .env(PARENT_NETNS_ENV, netns_id()))
}

/// Inside a helper: its mode, or `None` (with a line saying why it does nothing) when it was run
/// directly rather than by a parent test. With a mode, first panics unless this process left
/// the parent's network namespace ([`assert_fresh_netns`]): a helper never writes the host's.
pub fn helper_mode(helper_env: &str) -> Option<String> {
    let Ok(mode) = std::env::var(helper_env) else {
        eprintln!("the helper does nothing unless {helper_env} is set by a parent test");
        return None;
    };
    assert_fresh_netns();
    Some(mode)
}

/// Inside the helper: panics unless this process left the parent's network namespace.
pub fn assert_fresh_netns() {
    let parent = std::env::var(PARENT_NETNS_ENV).expect("parent netns passed by the parent test");
    assert_ne!(
        netns_id(),
        parent,
        "refusing to go on: the helper is not in a fresh network namespace"
    );
}

/// A path in the repository (where Cargo.toml is).
pub fn repo_path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
