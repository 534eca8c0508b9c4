//! Kernel tests for the agent's pod-tuning pass: "pods" are `unshare -n` processes placed in
//! cgroups named as the kubelet names them, found by `podnet` from this test's namespace and
//! tuned by `agent::pod_tune` with a real ledger; every value is read back with
//! `nsenter -t PID -n sysctl`, and this test's own namespace is checked unchanged.
//!
//! Needs root (namespaces, cgroups, setns); `NODETUNE_SKIP_ROOT_TESTS=1` turns that into a skip.

mod kernel;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use kernel::{root_or_skip, run};
use nodetune::agent::pod_tune::{PodPassInput, PodTuneOutcome, PodTuner};
use nodetune::api::{KeyState, NodeTuningProfile, NodeTuningProfileSpec};
use nodetune::podnet::Limits;
use nodetune::podtune::{PodInfo, plan_pods};
use nodetune::sysctl::{Ledger, Policy};

/// The v1 `name=systemd` hierarchy, as the podnet kernel tests use.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/systemd";
const KEYS: [&str; 3] = [
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_tw_reuse",
];
const WANTED: [&str; 3] = ["17", "20000\t40000", "1"];

/// A pod: one `unshare -n sleep` in its own cgroup; killed, then its cgroup removed, on drop.
struct FakePod {
    uid: String,
    child: Child,
    cgroup: PathBuf,
}

impl FakePod {
    fn start(top: &Path, uid: &str) -> Self {
        let cgroup = top.join(format!("kubepods/besteffort/pod{uid}"));
        std::fs::create_dir_all(&cgroup).expect("mkdir cgroup");
        let child = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .expect("unshare");
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("cgroup");
        // The namespace exists once /proc says the process is in another one than ours.
        let ours = std::fs::read_link("/proc/self/ns/net").expect("own ns");
        let theirs = format!("/proc/{}/ns/net", child.id());
        for _ in 0..200 {
            if std::fs::read_link(&theirs).is_ok_and(|l| l != ours) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self {
            uid: uid.to_string(),
            child,
            cgroup,
        }
    }

    fn read(&self, key: &str) -> String {
        let pid = self.child.id().to_string();
        run(Command::new("nsenter").args(["-t", &pid, "-n", "sysctl", "-n", key]))
            .trim()
            .to_string()
    }

    fn values(&self) -> Vec<String> {
        KEYS.iter().map(|k| self.read(k)).collect()
    }

    fn info(&self, app: &str) -> PodInfo {
        PodInfo {
            namespace: "web".into(),
            name: format!("{app}-{}", &self.uid[..8]),
            uid: self.uid.clone(),
            labels: [("app".to_string(), app.to_string())].into(),
            phase: Some("Running".into()),
            ..PodInfo::default()
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn host_values() -> Vec<String> {
    KEYS.iter()
        .map(|k| {
            std::fs::read_to_string(format!("/proc/sys/{}", k.replace('.', "/")))
                .expect("read")
                .trim()
                .to_string()
        })
        .collect()
}

fn squid_profile() -> NodeTuningProfile {
    NodeTuningProfile::new(
        "squid",
        NodeTuningProfileSpec {
            sysctls: KEYS
                .iter()
                .zip(["17", "20000 40000", "1"])
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pod_selector: nodetune::selector::from_pairs(&["app=squid".into()]).expect("sel"),
            restore_on_removal: true,
            ..Default::default()
        },
    )
}

fn pass(ledger: &mut Ledger, pods: &[PodInfo]) -> PodTuneOutcome {
    let profile = squid_profile();
    let plan = plan_pods(&BTreeMap::new(), [&profile], pods, &Policy::default());
    let known: BTreeSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
    let mut tuner = PodTuner::new(PathBuf::from("/proc"), Limits::default());
    tuner.pass(
        ledger,
        &PodPassInput {
            plan: &plan,
            known: &known,
            all_profiles: &[&profile],
            policy: &Policy::default(),
        },
    )
}

/// Removes the test's cgroup tree (bottom-up) once the pods are gone.
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        for sub in ["kubepods/besteffort", "kubepods", ""] {
            let _ = std::fs::remove_dir(self.0.join(sub));
        }
    }
}

fn uid(n: u32) -> String {
    format!("{:08x}-7777-4aaa-8aaa-{n:012x}", std::process::id())
}

/// Issue 18: a pod profile's keys reach the selected pod's namespace only (read back with
/// nsenter), originals recorded per pod namespace; a second pass (the agent restarted on the
/// same ledger) writes nothing; unselecting restores the originals in the living pod; a pod
/// that is gone leaves no ledger entry behind.
#[test]
fn a_pod_profile_tunes_the_selected_pod_only_restores_on_unselect_and_forgets_gone_pods() {
    if !root_or_skip("a_pod_profile_tunes_the_selected_pod_only") {
        return;
    }
    let tree = Tree(PathBuf::from(CGROUP_ROOT).join(format!("ntpodtune-{}", std::process::id())));
    let mut squid = FakePod::start(&tree.0, &uid(1));
    let other = FakePod::start(&tree.0, &uid(2));
    let (defaults, host_before) = (squid.values(), host_values());
    let state = tempfile::tempdir().expect("tmp");
    let mut ledger = Ledger::load(state.path()).expect("ledger").ledger;

    let out = pass(&mut ledger, &[squid.info("squid"), other.info("other")]);
    assert_eq!(squid.values(), WANTED, "{:?}", out.results);
    assert_eq!(other.values(), defaults, "the unselected pod is untouched");
    assert_eq!(host_values(), host_before, "the host is untouched");
    let applied = &out.results[&squid.uid];
    assert!(
        applied.iter().all(|r| r.state == KeyState::Applied),
        "{applied:?}"
    );
    let entry = &out.entries[0];
    assert_eq!(
        (entry.pods, entry.applied, entry.failed),
        (1, 1, 0),
        "{entry:?}"
    );
    assert_eq!(ledger.pod_entries().count(), 3);
    assert!(ledger.pod_entries().all(|e| e.pod_uid == squid.uid));

    // The agent restarts: same ledger on disk, nothing to write, nothing rewritten.
    drop(ledger);
    let mut ledger = Ledger::load(state.path()).expect("reload").ledger;
    let out = pass(&mut ledger, &[squid.info("squid"), other.info("other")]);
    assert_eq!(ledger.rewrites(), 0, "a restart re-applies nothing");
    assert!(out.results[&squid.uid].iter().all(|r| !r.changed));
    assert!(out.restored.is_empty());

    // Unselected while it lives: the originals come back.
    let out = pass(&mut ledger, &[squid.info("proxy"), other.info("other")]);
    assert_eq!(squid.values(), defaults, "{:?}", out.restored);
    assert_eq!(out.restored.len(), 3);
    assert_eq!(ledger.pod_entries().count(), 0);

    // Selected again, then gone: its entries are dropped, nothing is written anywhere.
    pass(&mut ledger, &[squid.info("squid")]);
    assert_eq!(ledger.pod_entries().count(), 3);
    squid.kill();
    let out = pass(&mut ledger, &[other.info("other")]);
    assert_eq!(out.dropped, 3);
    assert_eq!(ledger.pod_entries().count(), 0, "no ledger growth");
    assert_eq!(host_values(), host_before);
}

/// Originals are on disk before the kernel is written: with a ledger that cannot be written,
/// nothing changes inside the pod and the keys say why.
#[test]
fn no_original_on_disk_no_write_in_the_pod() {
    if !root_or_skip("no_original_on_disk_no_write_in_the_pod") {
        return;
    }
    let tree =
        Tree(PathBuf::from(CGROUP_ROOT).join(format!("ntpodtune-ro-{}", std::process::id())));
    let squid = FakePod::start(&tree.0, &uid(3));
    let defaults = squid.values();
    let state = tempfile::tempdir().expect("tmp");
    let mut ledger = Ledger::load(state.path()).expect("ledger").ledger;
    // The ledger's temp file name, taken by a directory: every persist fails.
    std::fs::create_dir(state.path().join(".ledger.json.tmp")).expect("block");
    std::fs::write(state.path().join(".ledger.json.tmp/x"), "").expect("block");
    let out = pass(&mut ledger, &[squid.info("squid")]);
    assert_eq!(squid.values(), defaults, "kernel not touched");
    let results = &out.results[&squid.uid];
    assert!(
        results.iter().all(|r| r.state == KeyState::Failed
            && r.message
                .as_deref()
                .is_some_and(|m| m.contains("kernel not touched"))),
        "{results:?}"
    );
    assert_eq!(ledger.pod_entries().count(), 0);
}
