//! How the binary reports a user's mistake: one `error:` line with its causes and exit status 1,
//! whatever RUST_BACKTRACE says (anyhow's Debug form would print a stack trace, which reads like
//! a crash). Needs nothing but the built binary.
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nodetune");

#[test]
fn user_error_is_one_line_without_a_backtrace_even_with_rust_backtrace_set() {
    let missing = tempfile::tempdir()
        .expect("tempdir")
        .path()
        .join("absent.yaml");
    let out = Command::new(BIN)
        .args(["plan", "-f"])
        .arg(&missing)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("nodetune runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(stderr.contains("absent.yaml"), "names the file: {stderr}");
    for trace in ["backtrace", "Backtrace", "Caused by", " at src/", "Error: "] {
        assert!(!stderr.contains(trace), "{trace:?} in {stderr}");
    }
}

#[test]
fn usage_errors_still_come_from_clap_with_status_2() {
    let out = Command::new(BIN)
        .args(["plan", "--no-such-flag"])
        .output()
        .expect("nodetune runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
