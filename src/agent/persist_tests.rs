//! The agent's pass with `persist: true` on a fake /proc/sys and a fake host root.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kube::core::DeserializeGuard;

use super::super::{AgentArgs, NodeSide, metrics::AgentMetrics};
use super::{DIR, FILE_NAME, TEMP_NAME};
use crate::api::{KeyState, NodeTuningProfile};
use crate::sysctl::{Ledger, SysctlKey};

const FIN: &str = "net.ipv4.tcp_fin_timeout";

struct Fake {
    proc_sys: tempfile::TempDir,
    host: tempfile::TempDir,
    state: tempfile::TempDir,
    args: AgentArgs,
}

impl Fake {
    fn new() -> Self {
        let proc_sys = tempfile::tempdir().expect("tmp");
        let host = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        for (rel, v) in [
            ("net/ipv4/tcp_fin_timeout", "60"),
            ("net/ipv4/tcp_tw_reuse", "2"),
        ] {
            let p = proc_sys.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, format!("{v}\n")).expect("write");
        }
        std::fs::create_dir_all(host.path().join(DIR)).expect("mkdir");
        let mut args = AgentArgs::for_tests("node-a", state.path(), proc_sys.path());
        args.host_root = host.path().into();
        Self {
            proc_sys,
            host,
            state,
            args,
        }
    }

    fn node(&self) -> NodeSide {
        NodeSide::open(&self.args, Arc::new(AgentMetrics::default())).expect("open")
    }

    fn file(&self) -> PathBuf {
        self.host.path().join(DIR).join(FILE_NAME)
    }

    fn persisted(&self) -> Option<String> {
        std::fs::read_to_string(self.file()).ok()
    }

    fn fin(&self) -> String {
        std::fs::read_to_string(self.proc_sys.path().join("net/ipv4/tcp_fin_timeout"))
            .expect("read")
            .trim()
            .to_owned()
    }

    fn set_fin(&self, v: &str) {
        std::fs::write(
            self.proc_sys.path().join("net/ipv4/tcp_fin_timeout"),
            format!("{v}\n"),
        )
        .expect("write");
    }

    fn policy(&mut self, text: &str) {
        let p = self.state.path().join("policy.yaml");
        std::fs::write(&p, text).expect("write");
        self.args.policy_file = Some(p);
    }
}

fn profile(
    name: &str,
    keys: &[(&str, &str)],
    persist: bool,
) -> Arc<DeserializeGuard<NodeTuningProfile>> {
    let mut p = NodeTuningProfile::test(name).with_sysctls(keys).restoring();
    p.spec.persist = persist;
    p.cached()
}

fn ledger_persisted(f: &Fake, node: NodeSide) -> Vec<String> {
    drop(node); // releases the ledger lock
    let l = Ledger::load(f.state.path()).expect("load").ledger;
    l.persisted().iter().map(SysctlKey::dotted).collect()
}

#[test]
fn the_file_appears_with_the_values_follows_edits_and_goes_with_the_profile() {
    let f = Fake::new();
    let mut node = f.node();
    let labels = BTreeMap::new();
    let other = profile("other", &[("net.ipv4.tcp_tw_reuse", "1")], false);
    let status = node.pass(
        &labels,
        &[profile("web", &[(FIN, "30")], true), other.clone()],
    );
    assert_eq!(f.fin(), "30");
    let text = f.persisted().expect("the file is written");
    assert!(
        text.contains("\n-net.ipv4.tcp_fin_timeout = 30\n"),
        "{text}"
    );
    assert!(
        !text.contains("tcp_tw_reuse"),
        "only persistent profiles' keys: {text}"
    );
    assert_eq!(status.persisted, vec![FIN.to_string()]);

    node.pass(
        &labels,
        &[profile("web", &[(FIN, "25")], true), other.clone()],
    );
    let text = f.persisted().expect("still there");
    assert!(text.contains("-net.ipv4.tcp_fin_timeout = 25\n"), "{text}");
    assert!(!text.contains("= 30"), "{text}");

    let status = node.pass(&labels, &[other]);
    assert_eq!(f.fin(), "60", "restored");
    assert_eq!(f.persisted(), None, "removed with the last persistent key");
    assert!(status.persisted.is_empty());
    assert!(ledger_persisted(&f, node).is_empty());
}

#[test]
fn the_ledger_names_the_persisted_keys_so_a_restore_knows_the_file() {
    let f = Fake::new();
    let mut node = f.node();
    node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "30")], true)]);
    assert_eq!(ledger_persisted(&f, node), vec![FIN.to_string()]);
    // A new agent (an upgrade, a restart) with no profile left removes the file.
    let mut node = f.node();
    node.pass(&BTreeMap::new(), &[]);
    assert_eq!(f.persisted(), None);
    assert_eq!(f.fin(), "60");
}

/// A SIGKILL after the sysctl write and before the file write: the kernel has the new value,
/// the file the old one and a half-written temporary file lies beside it. The next agent's
/// pass repairs the file; the original is still the pre-nodetune value.
#[test]
fn a_kill_between_the_sysctl_write_and_the_file_write_is_repaired_by_the_next_pass() {
    let f = Fake::new();
    let mut node = f.node();
    node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "30")], true)]);
    drop(node);
    // The state the kill left: kernel written, file not yet.
    f.set_fin("25");
    std::fs::write(f.host.path().join(DIR).join(TEMP_NAME), "-net.ipv4.tcp_fi").expect("w");
    assert!(f.persisted().expect("old file").contains("= 30"));

    let mut node = f.node();
    let status = node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "25")], true)]);
    let text = f.persisted().expect("file");
    assert!(text.contains("-net.ipv4.tcp_fin_timeout = 25\n"), "{text}");
    assert!(
        !f.host.path().join(DIR).join(TEMP_NAME).exists(),
        "stale temp file gone"
    );
    assert_eq!(status.drift_corrections, 0);
    node.pass(&BTreeMap::new(), &[]);
    assert_eq!(f.fin(), "60", "the original survived the crash");
    assert_eq!(f.persisted(), None);
}

#[test]
fn a_policy_that_forbids_persistence_writes_no_file_and_removes_ours() {
    let mut f = Fake::new();
    let mut node = f.node();
    node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "30")], true)]);
    assert!(f.persisted().is_some());
    drop(node);
    f.policy("allowPersist: false\n");
    let mut node = f.node();
    let status = node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "30")], true)]);
    assert_eq!(f.fin(), "30", "the keys still apply");
    assert_eq!(f.persisted(), None, "our file is removed");
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("profile web: persist is not allowed")),
        "{:?}",
        status.warnings
    );
}

#[test]
fn pod_targeting_profiles_are_never_persisted() {
    let f = Fake::new();
    let mut node = f.node();
    let mut p = NodeTuningProfile::test("pods").with_sysctls(&[(FIN, "30")]);
    p.spec.persist = true;
    p.spec.pod_selector = Some(Default::default());
    node.pass(&BTreeMap::new(), &[p.cached()]);
    assert_eq!(f.persisted(), None);
    assert_eq!(f.fin(), "60");
}

/// A read-only host mount (the chart's default): the keys apply, the report says why nothing
/// is persisted, and no ledger record is left that would point at a file never written.
#[test]
fn without_a_writable_sysctl_d_the_keys_apply_and_the_report_says_why() {
    let f = Fake::new();
    std::fs::remove_dir(f.host.path().join(DIR)).expect("rmdir");
    let mut node = f.node();
    let status = node.pass(&BTreeMap::new(), &[profile("web", &[(FIN, "30")], true)]);
    assert_eq!(f.fin(), "30");
    assert!(
        status.warnings.iter().any(|w| w.starts_with("persist: ")),
        "{:?}",
        status.warnings
    );
    assert!(status.persisted.is_empty());
    let results: Vec<KeyState> = status.sysctls.iter().map(|e| e.state).collect();
    assert_eq!(results, [KeyState::Applied]);
}
