use super::*;
use crate::plan::{Desired, Merged};
use crate::podtune::PodRef;

fn key(s: &str) -> SysctlKey {
    SysctlKey::parse(s).expect("key")
}

fn desired(k: &str, v: &str, mode: Mode) -> (String, Desired) {
    (
        k.to_string(),
        Desired {
            key: key(k),
            optional: false,
            value: v.into(),
            profile: "squid".into(),
            mode,
            priority: 0,
        },
    )
}

fn plan(keys: Vec<(String, Desired)>) -> PodPlan {
    PodPlan {
        pod: PodRef {
            namespace: "web".into(),
            name: "squid-0".into(),
            uid: "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10".into(),
        },
        merged: Merged {
            desired: keys.into_iter().collect(),
            ..Merged::default()
        },
        refused: Vec::new(),
        pod_owned: Vec::new(),
    }
}

fn reads(pairs: &[(&str, &str)]) -> Reads {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Ok(v.to_string())))
        .collect()
}

#[test]
fn only_keys_that_differ_are_written_and_only_unrecorded_originals_recorded() {
    let p = plan(vec![
        desired("net.ipv4.tcp_fin_timeout", "30", Mode::Enforce),
        desired("net.ipv4.ip_local_port_range", "32768 65000", Mode::Enforce),
        desired("net.ipv4.tcp_tw_reuse", "1", Mode::Enforce),
        desired("net.core.somaxconn", "8192", Mode::DryRun),
    ]);
    let r = reads(&[
        ("net.ipv4.tcp_fin_timeout", "60"),
        // The kernel's tab reads the same as the profile's space.
        ("net.ipv4.ip_local_port_range", "32768\t65000"),
        ("net.ipv4.tcp_tw_reuse", "2"),
        ("net.core.somaxconn", "4096"),
    ]);
    // tcp_tw_reuse was changed by an earlier pass (original 2 recorded then).
    let d = decide(&p, &r, 7, |k| {
        (k.dotted() == "net.ipv4.tcp_tw_reuse").then(|| "2".to_string())
    });
    let written: Vec<String> = d.sets.iter().map(|s| s.key.dotted()).collect();
    assert_eq!(
        written,
        ["net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_reuse"]
    );
    assert_eq!(d.record.len(), 1);
    assert_eq!(
        (
            d.record[0].key.dotted(),
            d.record[0].original.as_str(),
            d.record[0].netns_inode
        ),
        ("net.ipv4.tcp_fin_timeout".to_string(), "60", 7)
    );
    let states: Vec<(String, KeyState)> = d.done.iter().map(|r| (r.key.clone(), r.state)).collect();
    assert_eq!(
        states,
        [
            ("net.core.somaxconn".to_string(), KeyState::DryRun),
            (
                "net.ipv4.ip_local_port_range".to_string(),
                KeyState::Applied
            ),
        ]
    );
    assert!(!d.done[1].changed);
}

#[test]
fn an_unreadable_key_is_reported_and_not_written() {
    let p = plan(vec![desired(
        "net.ipv4.tcp_fin_timeout",
        "30",
        Mode::Enforce,
    )]);
    let mut r = Reads::new();
    r.insert(
        "net.ipv4.tcp_fin_timeout".into(),
        Err((KeyState::Unsupported, "no such key".into())),
    );
    let d = decide(&p, &r, 7, |_| None);
    assert!(d.sets.is_empty() && d.record.is_empty());
    assert_eq!(d.done[0].state, KeyState::Unsupported);
}

#[test]
fn a_restore_of_a_node_wide_or_denied_key_is_refused_and_kept() {
    let entry = |k: &str, v: &str| {
        crate::sysctl::ledger::PodLedgerEntry::new("u", 7, key(k), v, Some("squid"))
    };
    let policy = Policy::default();
    let refused = restore_set(&entry("vm.swappiness", "60"), &policy).expect_err("node-wide");
    assert_eq!(refused.state, KeyState::Denied);
    assert!(
        refused
            .message
            .as_deref()
            .is_some_and(|m| m.contains("is kept"))
    );
    let strict = crate::sysctl::SysctlPolicy::parse("deniedKeys: ['net\\.ipv4\\.tcp_fin_timeout']")
        .expect("policy")
        .compile()
        .expect("compile");
    assert!(restore_set(&entry("net.ipv4.tcp_fin_timeout", "60"), &strict).is_err());
    let set = restore_set(&entry("net.ipv4.tcp_fin_timeout", "60"), &policy).expect("allowed");
    assert!(set.restore);
}

#[test]
fn a_value_the_kernel_reads_back_otherwise_is_a_failure() {
    let set = Set {
        key: key("net.ipv4.tcp_fin_timeout"),
        value: "30".into(),
        original: Some("60".into()),
        restore: false,
        optional: false,
    };
    let ok = SetOutcome {
        previous: Ok("60".into()),
        write: Some(Ok(())),
        actual: Some(Ok("30".into())),
    };
    let r = outcome(&set, &ok);
    assert_eq!((r.state, r.changed), (KeyState::Applied, true));
    let clamped = SetOutcome {
        actual: Some(Ok("45".into())),
        ..ok
    };
    let r = outcome(&set, &clamped);
    assert_eq!(r.state, KeyState::Failed);
    assert!(r.message.as_deref().is_some_and(|m| m.contains("\"45\"")));
}
