//! The CRD's admission rules on a real kube-apiserver, for what the engine and `convert`
//! promise: optional (`-`) keys are accepted, the denylist still catches them, and every
//! manifest `nodetune convert` writes is accepted (server-side dry run). Needs root and the
//! control-plane binaries (tests/cluster/build); skips with a message without them unless
//! NODETUNE_REQUIRE_CLUSTER is set.
//!
//! Run: cargo test --test crd_admission -- --nocapture

mod support;

use std::process::Stdio;

use anyhow::{Context, Result, ensure};
use tokio::io::AsyncWriteExt;

use support::Cluster;

/// `kubectl apply --dry-run=server -f -` of `yaml`: Ok(stdout) or Err(stderr).
async fn dry_run(cluster: &Cluster, yaml: &str) -> Result<std::result::Result<String, String>> {
    let mut cmd = cluster.kubectl();
    cmd.args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("kubectl")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(yaml.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn profile(key: &str, value: &str) -> String {
    format!(
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {{name: adm}}\nspec:\n  sysctls:\n    {}: {}\n",
        serde_json::Value::String(key.into()),
        serde_json::Value::String(value.into())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn optional_keys_and_convert_output_pass_admission() {
    let Some(bin) = support::cluster_prereqs("optional_keys_and_convert_output_pass_admission")
    else {
        return;
    };
    if let Err(e) = run(&bin).await {
        panic!("{e:#}");
    }
}

async fn run(bin: &std::path::Path) -> Result<()> {
    let cluster = Cluster::start(bin).await?;
    let root = support::repo_root();
    let out = cluster
        .kubectl()
        .args(["apply", "-f", &root.join("crds").to_string_lossy()])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let long = format!("vm.{}", "a".repeat(252)); // 255 bytes
    for (key, ok, needle) in [
        ("-net.ipv4.tcp_tw_recycle", true, ""),
        ("-net/ipv4/conf/eth0.100/rp_filter", true, ""),
        (&*format!("-{long}"), true, ""),
        (&*format!("{long}a"), false, "not a valid sysctl name"),
        ("-kernel.core_pattern", false, "is denied"),
        ("-kernel/usermodehelper/bset", false, "is denied"),
        ("--net.ipv4.x", false, "not a valid sysctl name"),
        ("-", false, "not a valid sysctl name"),
    ] {
        match dry_run(&cluster, &profile(key, "1")).await? {
            Ok(_) => ensure!(ok, "{key}: accepted, should be refused"),
            Err(e) => ensure!(!ok && e.contains(needle), "{key}: {e}"),
        }
    }

    // Values: C0 and C1 control characters are refused, as the engine refuses them.
    for (value, ok) in [
        ("1024\t65000", true),
        ("1\n0", false),
        ("\u{9b}31m", false),
        ("caf\u{e9}", true),
    ] {
        let yaml = profile("net.ipv4.tcp_fin_timeout", value);
        match dry_run(&cluster, &yaml).await? {
            Ok(_) => ensure!(ok, "{value:?}: accepted, should be refused"),
            Err(e) => ensure!(!ok && e.contains("control character"), "{value:?}: {e}"),
        }
    }

    // What `nodetune convert` writes from a messy sysctl.conf is accepted as is.
    let conf = "net.ipv4.tcp_fin_timeout = 30 # comment\n-net.ipv4.tcp_tw_recycle = 1\n\
                net.ipv4.conf.*.rp_filter = 1\nkernel.core_pattern = |/bin/sh\n\
                net.ipv4.tcp_syncookies = yes\nnet.core.somaxconn = 1:20\n";
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodetune"));
    cmd.args(["convert", "--name", "legacy", "--selector", "role=on", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(conf.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(out.status.code() == Some(2), "lines were left out: {out:?}");
    let yaml = String::from_utf8(out.stdout)?;
    if let Err(e) = dry_run(&cluster, &yaml).await? {
        anyhow::bail!("the apiserver refused convert's output: {e}\n{yaml}");
    }
    Ok(())
}
