//! Test support: a real Kubernetes control plane with simulated nodes.
//!
//! Include it from an integration test with `mod support;`. The control plane itself is
//! started and stopped by the shell scripts in `tests/cluster/` (`up`, `node`, `down`), the
//! same ones a person uses for a demo, so there is exactly one way a cluster comes up; this
//! module adds what only a test needs: a typed client, simulated nodes as values, and the
//! node shim ([`shim`]) that plays the kubelet for pods on simulated nodes.
//!
//! Cluster tests are marked `#[ignore = "needs root and the control plane ..."]`, so a plain
//! `cargo test` counts them as ignored (skipped, never passed); `scripts/test` runs them with
//! `--ignored`. Prerequisites (root, the built binaries) are then checked by
//! [`cluster_prereqs`]: a test that cannot run prints a SKIPPED banner on the terminal (not
//! captured), unless `NODETUNE_REQUIRE_CLUSTER` is set (CI), in which case it fails.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod deploy;
pub mod e2e;
pub mod faults;
pub mod fixtures;
pub mod helm;
pub mod kubelet;
pub mod pod_workload;
pub mod shim;
pub mod socket_script;
pub mod sockets;

pub use cluster::{Cluster, SimNode};
pub use kubelet::{KubeletNode, kubelet_prereqs};

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Directory holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
/// and helm: `NODETUNE_CLUSTER_BIN` when set, else what `tests/cluster/build --print-bin-dir`
/// says (the versioned cache directory the build script fills).
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NODETUNE_CLUSTER_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let out = Command::new(repo_root().join("tests/cluster/build"))
        .arg("--print-bin-dir")
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Binaries a cluster test needs, all in [`bin_dir`].
pub const CLUSTER_BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
];

fn require_cluster() -> bool {
    std::env::var("NODETUNE_REQUIRE_CLUSTER").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Checks what a cluster test needs. Returns the bin dir when all is there. Otherwise prints
/// why and returns `None` (the test should return early: skipped), or panics when
/// `NODETUNE_REQUIRE_CLUSTER` is set.
pub fn cluster_prereqs(test: &str) -> Option<PathBuf> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (bridges and network namespaces)".to_string());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        missing.push("the `ip` command (iproute2)".to_string());
    }
    let bin = bin_dir();
    note_absent(
        bin.as_deref(),
        "--print-bin-dir",
        CLUSTER_BINARIES,
        Path::is_file,
        &mut missing,
    );
    if missing.is_empty() {
        return bin;
    }
    skip_or_fail(test, "cluster", &missing);
    None
}

/// Adds to `missing` what `tests/cluster/build` should have put in `dir`: the directory itself
/// (when `--print-...-dir` failed) or the `names` not `present` in it.
pub fn note_absent(
    dir: Option<&Path>,
    print_flag: &str,
    names: &[&str],
    present: fn(&Path) -> bool,
    missing: &mut Vec<String>,
) {
    let Some(dir) = dir else {
        missing.push(format!("tests/cluster/build {print_flag} failed"));
        return;
    };
    let absent: Vec<_> = names
        .iter()
        .filter(|b| !present(&dir.join(b)))
        .copied()
        .collect();
    if !absent.is_empty() {
        missing.push(format!(
            "{} in {} (run tests/cluster/build)",
            absent.join(", "),
            dir.display()
        ));
    }
}

/// What a test does when its prerequisites are `missing`: fails when
/// `NODETUNE_REQUIRE_CLUSTER` is set, else prints a skip banner (the caller returns early).
pub fn skip_or_fail(test: &str, kind: &str, missing: &[String]) {
    let why = missing.join("; ");
    if require_cluster() {
        panic!(
            "{test}: NODETUNE_REQUIRE_CLUSTER is set but the {kind} test cannot run: missing {why}"
        );
    }
    skip_banner(test, &why);
}

/// Prints a skip so nobody mistakes the test's "ok" for a pass. Written to the stderr handle,
/// not with eprintln!, so the test harness does not capture it.
pub fn skip_banner(test: &str, why: &str) {
    let line = "#".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "{line}\n# SKIPPED {test}\n#   missing {why}\n#   (NODETUNE_REQUIRE_CLUSTER=1 makes this a failure)\n{line}"
    );
}

/// Polls `check` every `every` until it returns `Some`, or fails after `timeout` with the
/// last observation (`Err` values of `check` are observations too, not fatal).
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}: last: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// `kubectl ARGS` against the cluster; its stdout, or an error with its stderr.
pub async fn kubectl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let out = cluster.kubectl().args(args).output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One plain HTTP GET (the metrics and probe endpoints speak HTTP/1.1 and close the
/// connection): the whole response, headers included.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = std::time::Duration::from_secs(10);
    let mut s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(timeout, s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// Runs `cmd` to completion; its stdout, or an error naming `what` with both outputs.
pub async fn run(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm install nodetune charts/nodetune` into `nodetune-system` (created) with the demo policy
/// values (network-namespace keys only: simulated and kubelet nodes share this machine's
/// kernel), then `extra` arguments.
pub async fn helm_install_demo(cluster: &Cluster, extra: &[&str]) -> anyhow::Result<String> {
    let mut cmd = cluster.helm();
    cmd.current_dir(repo_root())
        .args(["install", "nodetune", "charts/nodetune"])
        .args(["--namespace", "nodetune-system", "--create-namespace"])
        .args(["-f", "charts/nodetune/ci/demo-values.yaml"])
        .args(extra);
    run(&mut cmd, "helm install").await
}

/// Peak RSS (VmHWM, KiB), current RSS (KiB) and CPU seconds (user + system) of a process, for
/// the benchmarks.
pub fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'. Clock
    // ticks (10 ms) include threads that have exited (tokio's blocking pool); per-thread
    // schedstat would not.
    let cpu = (ticks(11) + ticks(12)) as f64 / hz;
    Ok((field("VmHWM:"), field("VmRSS:"), cpu))
}
