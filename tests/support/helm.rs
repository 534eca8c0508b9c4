//! Helm for tests: where the binary is, and the chart rendered as the tests and
//! scripts/render-deploy render it. Include with `#[path = "support/helm.rs"] mod helm;` from
//! tests that need no cluster.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Kubernetes version the cluster tests run (tests/cluster/versions.env), without the `v`.
pub fn kube_version() -> String {
    let env = std::fs::read_to_string(repo_root().join("tests/cluster/versions.env"))
        .expect("tests/cluster/versions.env is readable");
    env.lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .expect("K8S_VERSION in versions.env")
}

/// helm from `$HELM`, `NODETUNE_CLUSTER_BIN`, the build cache, else PATH. `None` (with a loud
/// SKIPPED line) when there is none, or a panic when `NODETUNE_REQUIRE_CLUSTER` is set (CI).
pub fn helm(test: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(h) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        candidates.push(PathBuf::from(h));
    }
    if let Some(d) = std::env::var_os("NODETUNE_CLUSTER_BIN").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d).join("helm"));
    }
    if let Ok(out) = Command::new(repo_root().join("tests/cluster/build"))
        .arg("--print-bin-dir")
        .output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        candidates.push(PathBuf::from(dir).join("helm"));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        candidates.push(dir.join("helm"));
    }
    if let Some(h) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(h);
    }
    let required =
        std::env::var("NODETUNE_REQUIRE_CLUSTER").is_ok_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!(
            "{test}: NODETUNE_REQUIRE_CLUSTER is set but there is no helm (run tests/cluster/build)"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no helm binary (run tests/cluster/build). Set NODETUNE_REQUIRE_CLUSTER=1 to make this a failure."
    );
    None
}

/// `helm template nodetune charts/nodetune` with `args` appended; Ok(stdout) or Err(stderr).
pub fn template(helm: &Path, args: &[&str]) -> Result<String, String> {
    let kube = kube_version();
    let out = Command::new(helm)
        .current_dir(repo_root())
        .args([
            "template",
            "nodetune",
            "charts/nodetune",
            "--namespace",
            "nodetune-system",
            "--kube-version",
            &kube,
        ])
        .args(args)
        .output()
        .expect("helm runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The YAML documents of a multi-document text, as JSON values (empty documents dropped).
pub fn documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}
