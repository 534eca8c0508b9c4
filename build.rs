//! Sets `NODETUNE_GIT_COMMIT` for `nodetune --version`: the `NODETUNE_GIT_COMMIT` environment
//! variable if set (image builds, tarballs), else `git rev-parse` when the crate is a git
//! checkout, else `unknown`. Not re-run on every commit (that would rebuild the library each
//! time); a clean build or the variable refreshes it.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NODETUNE_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = std::env::var("NODETUNE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=NODETUNE_GIT_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    // Only our own checkout: a tarball unpacked inside another repository must not report that
    // repository's commit.
    if !Path::new(&dir).join(".git").exists() {
        return None;
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&dir)
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !commit.trim().is_empty()).then(|| commit.trim().to_string())
}
