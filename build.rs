//! Embeds the git commit in `nodetune --version` (NODETUNE_GIT_COMMIT overrides it, e.g. in an
//! image build without .git). Reruns only when HEAD or the checked-out ref moves.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=NODETUNE_GIT_COMMIT");
    let commit = std::env::var("NODETUNE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Worktrees keep HEAD outside ./.git; ask git where it is.
            let watch = |path: &str| {
                if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", path])
                    && std::path::Path::new(&p).exists()
                {
                    println!("cargo:rerun-if-changed={p}");
                }
            };
            watch("HEAD");
            watch("packed-refs");
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&r);
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NODETUNE_GIT_COMMIT={commit}");
}
