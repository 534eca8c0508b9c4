//! The local commands end to end: the built binary run inside a named network namespace this
//! test creates (`ip netns exec`), checked with `sysctl -n` in the same namespace. Root only;
//! the host's own namespace is never written.
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

mod kernel;

use kernel::root_or_skip;

const BIN: &str = env!("CARGO_BIN_EXE_nodetune");

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nt-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name)
    }

    fn run(&self, cmd: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(cmd);
        output_with_stdin(c, stdin)
    }

    /// `nodetune ARGS -o json` in the namespace: checks the exit status (`why` says what it
    /// means) and returns the JSON it printed.
    fn nodetune_json(&self, args: &[&str], status: Option<i32>, why: &str) -> serde_json::Value {
        let cmd: Vec<&str> = [BIN]
            .iter()
            .chain(args)
            .chain(&["-o", "json"])
            .copied()
            .collect();
        let out = self.run(&cmd, None);
        assert_eq!(
            out.status.code(),
            status,
            "{why}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out)
    }

    fn sysctl(&self, key: &str) -> String {
        let out = self.run(&["sysctl", "-n", key], None);
        assert!(
            out.status.success(),
            "sysctl -n {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Runs `c` to completion, feeding it `stdin` when given.
fn output_with_stdin(mut c: Command, stdin: Option<&str>) -> Output {
    let Some(input) = stdin else {
        return c.output().expect("command runs");
    };
    use std::io::Write;
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// The built binary, outside any namespace (for the commands that touch no sysctl).
fn nodetune(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    output_with_stdin(c, stdin)
}

/// A fresh namespace and a scratch directory for `test`, or `None` when it is skipped (not
/// root, see [`root_or_skip`]).
fn netns_and_dir(test: &str) -> Option<(Netns, tempfile::TempDir)> {
    root_or_skip(test).then(|| (Netns::new(), tempfile::tempdir().expect("tmp")))
}

/// [`nodetune`]'s standard output, after checking its exit status.
fn nodetune_stdout(args: &[&str], stdin: Option<&str>, status: Option<i32>) -> String {
    let out = nodetune(args, stdin);
    assert_eq!(
        out.status.code(),
        status,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `apply --local -f PROFILE --state-dir STATE`.
fn apply_local<'a>(profile: &'a std::path::Path, state: &'a std::path::Path) -> [&'a str; 6] {
    let utf8 = |p: &'a std::path::Path| p.to_str().expect("utf8");
    [
        "apply",
        "--local",
        "-f",
        utf8(profile),
        "--state-dir",
        utf8(state),
    ]
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn state_of<'a>(results: &'a serde_json::Value, key: &str) -> &'a str {
    results
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == key))
        .and_then(|r| r["state"].as_str())
        .unwrap_or_else(|| panic!("no result for {key} in {results}"))
}

const PROFILE: &str = "\
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata: {name: cli-test}
spec:
  sysctls:
    net.ipv4.tcp_fin_timeout: \"30\"
    net.ipv4.ip_local_port_range: \"1024 65000\"
    net.ipv4.tcp_tw_recycle: \"1\"
    net.ipv4.tcp_syncookies: \"abc\"
";

#[test]
fn apply_reports_per_key_and_restore_puts_defaults_back() {
    let Some((ns, dir)) = netns_and_dir("apply_reports_per_key_and_restore_puts_defaults_back")
    else {
        return;
    };
    let profile = dir.path().join("p.yaml");
    std::fs::write(&profile, PROFILE).expect("write profile");
    let state = dir.path().join("state");
    let (state_s, profile_s) = (
        state.to_str().expect("utf8"),
        profile.to_str().expect("utf8"),
    );
    let before_fin = ns.sysctl("net.ipv4.tcp_fin_timeout");
    let before_range = ns.sysctl("net.ipv4.ip_local_port_range");
    let host_fin =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout").expect("host value");

    let plan = ns.nodetune_json(
        &["plan", "-f", profile_s],
        Some(2),
        "plan exits 2 when a key would not apply",
    );
    let action = |k: &str| {
        plan["items"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["key"] == k))
            .map(|i| i["action"].clone())
    };
    assert_eq!(action("net.ipv4.tcp_fin_timeout"), Some("set".into()));
    assert_eq!(
        action("net.ipv4.tcp_tw_recycle"),
        Some("unsupported".into())
    );
    assert!(
        plan["warnings"].to_string().contains("30000"),
        "NodePort overlap warned: {plan}"
    );

    let results = ns.nodetune_json(
        &["apply", "--local", "-f", profile_s, "--state-dir", state_s],
        Some(2),
        "a bad key makes exit 2",
    );
    assert_eq!(state_of(&results, "net.ipv4.tcp_fin_timeout"), "Applied");
    assert_eq!(
        state_of(&results, "net.ipv4.ip_local_port_range"),
        "Applied"
    );
    assert_eq!(state_of(&results, "net.ipv4.tcp_tw_recycle"), "Unsupported");
    assert_eq!(state_of(&results, "net.ipv4.tcp_syncookies"), "Invalid");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fin_timeout"), "30");
    assert_eq!(ns.sysctl("net.ipv4.ip_local_port_range"), "1024 65000");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout").expect("host value"),
        host_fin,
        "the host namespace is untouched"
    );
    let ledger = std::fs::read_to_string(state.join("ledger.json")).expect("ledger written");
    assert!(
        ledger.contains("tcp_fin_timeout") && ledger.contains(&before_fin),
        "{ledger}"
    );

    let results = ns.nodetune_json(
        &["restore", "--local", "--state-dir", state_s],
        Some(0),
        "restore",
    );
    assert_eq!(state_of(&results, "net.ipv4.tcp_fin_timeout"), "Restored");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fin_timeout"), before_fin);
    assert_eq!(ns.sysctl("net.ipv4.ip_local_port_range"), before_range);

    let out = ns.run(&[BIN, "restore", "--local", "--state-dir", state_s], None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to restore"));
}

#[test]
fn apply_sets_a_corrupt_ledger_aside_and_says_so() {
    let Some((ns, dir)) = netns_and_dir("apply_sets_a_corrupt_ledger_aside_and_says_so") else {
        return;
    };
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(state.join("ledger.json"), "{not json").expect("corrupt");
    let profile = dir.path().join("p.yaml");
    std::fs::write(
        &profile,
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: x}\nspec: {sysctls: {net.ipv4.tcp_fin_timeout: \"31\"}}\n",
    )
    .expect("write");
    let args: Vec<&str> = [BIN]
        .into_iter()
        .chain(apply_local(&profile, &state))
        .collect();
    let out = ns.run(&args, None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "originals were lost: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("moved to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let aside: Vec<_> = std::fs::read_dir(&state)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ledger.json.corrupt")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the corrupt ledger is kept beside the new one"
    );
    assert_eq!(
        std::fs::read_to_string(aside[0].path()).expect("read"),
        "{not json"
    );
    assert_eq!(ns.sysctl("net.ipv4.tcp_fin_timeout"), "31");
}

#[test]
fn convert_turns_sysctl_conf_into_a_profile() {
    let conf = "# mail\nnet.ipv4.tcp_fin_timeout = 30\nnet.ipv4.tcp_tw_recycle=1\nnet.ipv4.no_such_key_here = 5\n";
    let out = nodetune(
        &["convert", "-", "--name", "mail", "--selector", "role=mail"],
        Some(conf),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("4.12") && stderr.contains("NAT"),
        "tw_recycle warning: {stderr}"
    );
    assert!(
        stderr.contains("no_such_key_here") && stderr.contains("does not exist"),
        "{stderr}"
    );
    let profiles = nodetune::manifest::parse_profiles(&String::from_utf8_lossy(&out.stdout))
        .expect("valid manifest");
    let p = &profiles[0];
    assert_eq!(p.metadata.name.as_deref(), Some("mail"));
    assert_eq!(p.spec.sysctls.len(), 3, "unknown keys are kept");
    assert_eq!(
        p.spec
            .node_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|m| m.get("role"))
            .map(String::as_str),
        Some("mail")
    );

    let bad = nodetune(
        &["convert", "/nonexistent/sysctl.conf", "--name", "x"],
        None,
    );
    assert!(!bad.status.success());
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("bad.conf");
    std::fs::write(&f, "just words\n").expect("write");
    let bad = nodetune(&["convert", f.to_str().expect("utf8"), "--name", "x"], None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 1"));
}

fn write_ledger(state: &std::path::Path, entries: &[(&str, &str)]) {
    std::fs::create_dir_all(state).expect("mkdir");
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|(k, v)| {
            serde_json::json!({"key": k, "original": v, "scope": "NetworkNamespace", "firstChangedUnix": 1})
        })
        .collect();
    let text = serde_json::json!({"version": 1, "entries": entries}).to_string();
    std::fs::write(state.join("ledger.json"), text).expect("write ledger");
}

/// Defects 1 and 4 through the binary: `restore --local` checks every ledger entry like a
/// profile's key (value checks, cluster policy), keeps what it refuses, exits 2; a corrupt
/// ledger makes it exit 2 and say where the file went.
#[test]
fn restore_refuses_forged_entries_and_reports_a_corrupt_ledger() {
    let Some((ns, dir)) =
        netns_and_dir("restore_refuses_forged_entries_and_reports_a_corrupt_ledger")
    else {
        return;
    };
    let state = dir.path().join("state");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "deniedKeys: ['net\\.ipv4\\.tcp_keepalive_.*']\n").expect("write");
    let cookies = ns.sysctl("net.ipv4.tcp_syncookies");
    let keepalive = ns.sysctl("net.ipv4.tcp_keepalive_time");
    write_ledger(
        &state,
        &[
            ("net.ipv4.tcp_fin_timeout", "45"),
            ("net.ipv4.tcp_syncookies", "0\n1"),
            ("net.ipv4.tcp_keepalive_time", "100"),
        ],
    );
    let (state_s, policy_s) = (
        state.to_str().expect("utf8"),
        policy.to_str().expect("utf8"),
    );
    let results = ns.nodetune_json(
        &[
            "restore",
            "--local",
            "--state-dir",
            state_s,
            "--policy",
            policy_s,
        ],
        Some(2),
        "restore exits 2 for the keys the policy refuses",
    );
    assert_eq!(state_of(&results, "net.ipv4.tcp_fin_timeout"), "Restored");
    assert_eq!(state_of(&results, "net.ipv4.tcp_syncookies"), "Invalid");
    assert_eq!(state_of(&results, "net.ipv4.tcp_keepalive_time"), "Denied");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fin_timeout"), "45");
    assert_eq!(ns.sysctl("net.ipv4.tcp_syncookies"), cookies);
    assert_eq!(ns.sysctl("net.ipv4.tcp_keepalive_time"), keepalive);
    let ledger = std::fs::read_to_string(state.join("ledger.json")).expect("ledger");
    assert!(
        ledger.contains("tcp_syncookies") && ledger.contains("tcp_keepalive_time"),
        "refused entries kept: {ledger}"
    );
    assert!(!ledger.contains("tcp_fin_timeout"), "{ledger}");

    std::fs::write(state.join("ledger.json"), "{not json").expect("corrupt");
    let out = ns.run(&[BIN, "restore", "--local", "--state-dir", state_s], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{state_s}/ledger.json.corrupt-")),
        "names the set-aside file: {stderr}"
    );
}

/// Optional keys through the binary: a missing `-` key does not fail apply.
#[test]
fn optional_missing_key_does_not_fail_apply() {
    let Some((ns, dir)) = netns_and_dir("optional_missing_key_does_not_fail_apply") else {
        return;
    };
    let profile = dir.path().join("p.yaml");
    std::fs::write(
        &profile,
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: x}\nspec: {sysctls: {-net.ipv4.tcp_tw_recycle: \"1\", net.ipv4.tcp_fin_timeout: \"33\"}}\n",
    )
    .expect("write");
    let state = dir.path().join("state");
    let results = ns.nodetune_json(
        &apply_local(&profile, &state),
        Some(0),
        "a missing optional key does not fail apply",
    );
    assert_eq!(state_of(&results, "net.ipv4.tcp_tw_recycle"), "Unsupported");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fin_timeout"), "33");
}

fn profile_text(mode: &str, sysctls: &[(&str, &str)]) -> String {
    let body: Vec<String> = sysctls
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {{name: p}}\nspec:\n  {mode}\n  sysctls:\n{}",
        body.concat()
    )
}

/// Defects 6, 8 and 9 (plan only reads, so no namespace is needed): unknown fields are refused
/// by name; plan exits 2 when a key would not apply and 0 when all would; the mode is shown;
/// `-f -` and `-f DIR` work; a closed stdout ends quietly.
#[test]
fn plan_gates_ci_refuses_unknown_fields_and_survives_a_closed_pipe() {
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    let typo = write(
        "typo.yaml",
        &profile_text("modee: DryRun", &[("net.ipv4.tcp_fin_timeout", "30")]),
    );
    let out = nodetune(&["plan", "-f", &typo], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field spec.modee"));

    let sub = dir.path().join("ok");
    std::fs::create_dir(&sub).expect("mkdir");
    let good = profile_text("mode: DryRun", &[("net.ipv4.tcp_fin_timeout", "30")]);
    std::fs::write(sub.join("a.yaml"), &good).expect("write");
    std::fs::write(sub.join("notes.txt"), "not a manifest").expect("write");
    let stdout = nodetune_stdout(&["plan", "-f", sub.to_str().expect("utf8")], None, Some(0));
    assert!(
        stdout.contains("MODE") && stdout.contains("DryRun"),
        "{stdout}"
    );

    let bad = profile_text(
        "mode: Enforce",
        &[
            ("net.ipv4.tcp_fin_timeout", "30"),
            ("net.ipv4.tcp_syncookies", "1\\u001b[31m"),
        ],
    );
    let stdout = nodetune_stdout(&["plan", "-f", "-"], Some(&bad), Some(2));
    assert!(
        !stdout.contains('\u{1b}'),
        "escape sequences are never printed raw: {stdout}"
    );
    assert!(stdout.contains("invalid"), "{stdout}");

    // More than a pipe buffer of output, read by a reader that stops after one byte.
    let many: Vec<(String, String)> = (0..256)
        .map(|i| (format!("net.ipv4.no_such_key_{i}"), "1".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let big = write("big.yaml", &profile_text("mode: Enforce", &many));
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("{BIN} plan -f {big} -o json | head -c1 >/dev/null; exit ${{PIPESTATUS[0]}}"),
        ])
        .output()
        .expect("bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "its own status, not a panic: {stderr}"
    );
}

/// `restore --local` also removes the agent's persistence file (`spec.persist`) that the
/// ledger records, so the next boot does not bring the tuned values back; with a host root
/// that does not exist it says so, exits partial and the ledger keeps the record.
#[test]
fn restore_removes_the_persistence_file_the_ledger_records() {
    let Some((ns, dir)) = netns_and_dir("restore_removes_the_persistence_file_the_ledger_records")
    else {
        return;
    };
    let state = dir.path().join("state");
    let host = dir.path().join("host");
    let sysctl_d = host.join(nodetune::agent::persist::DIR);
    std::fs::create_dir_all(&state).expect("mkdir state");
    std::fs::create_dir_all(&sysctl_d).expect("mkdir sysctl.d");
    let file = sysctl_d.join(nodetune::agent::persist::FILE_NAME);
    std::fs::write(&file, "net.ipv4.tcp_fin_timeout = 31\n").expect("persist file");
    let record = |ledger: &mut nodetune::sysctl::Ledger| {
        let key = nodetune::sysctl::SysctlKey::parse("net.ipv4.tcp_fin_timeout").expect("key");
        ledger.set_persisted([key].into()).expect("record");
    };
    let mut ledger = nodetune::sysctl::Ledger::load(&state)
        .expect("ledger")
        .ledger;
    record(&mut ledger);
    drop(ledger);
    let (state_s, host_s) = (
        state.to_str().expect("utf-8"),
        host.to_str().expect("utf-8"),
    );

    let missing = dir.path().join("no-such-root");
    let args = ["restore", "--local", "--state-dir", state_s, "--host-root"];
    let out = ns.run(
        &[&[BIN][..], &args, &[missing.to_str().expect("utf-8")]].concat(),
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing host root is a partial restore"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
    let kept = nodetune::sysctl::Ledger::load(&state)
        .expect("ledger")
        .ledger;
    assert_eq!(kept.persisted().len(), 1, "the record is kept");
    drop(kept);

    let out = ns.run(&[&[BIN][..], &args, &[host_s]].concat(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists(), "the persistence file is gone");
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed"));
    let after = nodetune::sysctl::Ledger::load(&state)
        .expect("ledger")
        .ledger;
    assert!(
        after.persisted().is_empty(),
        "the record went with the file"
    );
}
