//! The agent's pass against a second writer on a fake /proc/sys (the kernel tier does the same
//! on a real one).
use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::DeserializeGuard;

use super::super::{AgentArgs, NodeSide, metrics::AgentMetrics};
use crate::api::{KeyState, NodeTuningProfile};

fn web() -> Arc<DeserializeGuard<NodeTuningProfile>> {
    NodeTuningProfile::test("web")
        .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
        .cached()
}

/// Another writer puts 60 back before every pass: after the threshold the key is reported
/// Contested with the foreign value and the boot-config line that sets it, and the agent
/// writes it fewer times than it was changed behind its back.
#[test]
fn a_key_another_writer_keeps_resetting_is_contested_and_written_less_often() {
    let proc_sys = tempfile::tempdir().expect("tmp");
    let host = tempfile::tempdir().expect("tmp");
    let state = tempfile::tempdir().expect("tmp");
    let fin = proc_sys.path().join("net/ipv4/tcp_fin_timeout");
    std::fs::create_dir_all(fin.parent().expect("parent")).expect("mkdir");
    std::fs::write(&fin, "60\n").expect("write");
    let conf = host.path().join("etc/sysctl.d");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::write(
        conf.join("10-tuned.conf"),
        "net.ipv4.tcp_fin_timeout = 60\n",
    )
    .expect("w");
    let mut args = AgentArgs::for_tests("node-a", state.path(), proc_sys.path());
    args.host_root = host.path().into();
    args.contest_threshold = 3;
    let metrics = Arc::new(AgentMetrics::default());
    let mut node = NodeSide::open(&args, metrics.clone()).expect("open");
    let labels = BTreeMap::new();

    node.pass(&labels, &[web()]);
    let (mut foreign_writes, mut our_writes) = (0, 0);
    let mut last = None;
    for _ in 0..20 {
        std::fs::write(&fin, "60\n").expect("the other writer");
        foreign_writes += 1;
        let status = node.pass(&labels, &[web()]);
        if std::fs::read_to_string(&fin).expect("read").trim() == "30" {
            our_writes += 1;
        }
        last = Some(status);
    }
    let status = last.expect("passes ran");
    assert!(
        our_writes < foreign_writes,
        "{our_writes} writes for {foreign_writes} foreign ones"
    );
    let c = status.contested.first().expect("contested");
    assert_eq!(
        (c.key.as_str(), c.foreign_value.as_str()),
        ("net.ipv4.tcp_fin_timeout", "60")
    );
    assert!(c.corrections > 3, "{c:?}");
    assert_eq!(c.profile.as_deref(), Some("web"), "for the profile status");
    assert!(c.backoff_until.is_some(), "{c:?}");
    assert!(
        c.source
            .as_deref()
            .is_some_and(|s| s.contains("/etc/sysctl.d/10-tuned.conf:1")),
        "{c:?}"
    );
    let entry = &status.sysctls[0];
    assert_eq!(entry.state, KeyState::Contested, "{entry:?}");
    let text = metrics.render();
    assert!(
        text.contains("nodetune_agent_contested_keys_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "nodetune_agent_contest_holds_total {}\n",
            foreign_writes - our_writes
        )),
        "{text}"
    );
    assert!(status.drift_corrections >= 3);
    // A held key's report does not change from pass to pass (no write per pass).
    std::fs::write(&fin, "60\n").expect("the other writer");
    let again = node.pass(&labels, &[web()]);
    assert_eq!(again.contested, status.contested);
}
