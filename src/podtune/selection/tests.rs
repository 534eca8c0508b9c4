use super::*;
use crate::podtune::{HeldPodKey, PodNetns, RestoreDecision, restore_decisions, summarise};
use crate::sysctl::{KeyResult, SysctlPolicy};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn profile(name: &str, priority: i32, sysctls: &[(&str, &str)]) -> NodeTuningProfile {
    NodeTuningProfile::test(name)
        .with_sysctls(sysctls)
        .with_priority(priority)
        .restoring()
}

fn for_pods(mut p: NodeTuningProfile, app: &str) -> NodeTuningProfile {
    p.spec.pod_selector = selector::from_pairs(&[format!("app={app}")]).expect("pair");
    p
}

fn pod(ns: &str, name: &str, app: &str) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        labels: labels(&[("app", app)]),
        namespace_labels: labels(&[("team", ns)]),
        phase: Some("Running".into()),
        ..Default::default()
    }
}

fn node() -> BTreeMap<String, String> {
    labels(&[("role", "proxy")])
}

fn keys(p: &PodPlan) -> Vec<(&str, &str)> {
    p.merged
        .desired
        .iter()
        .map(|(k, d)| (k.as_str(), d.value.as_str()))
        .collect()
}

#[test]
fn selected_pods_get_their_profiles_merged_by_priority() {
    let squid = for_pods(
        profile(
            "squid",
            5,
            &[
                ("net.ipv4.tcp_fin_timeout", "15"),
                ("net.ipv4.ip_local_port_range", "1024 65000"),
            ],
        ),
        "squid",
    );
    let mut all_edge = profile(
        "edge",
        1,
        &[
            ("net.ipv4.tcp_fin_timeout", "30"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ],
    );
    all_edge.spec.namespace_selector = selector::from_pairs(&["team=edge".into()]).expect("pair");
    let host = profile("host", 9, &[("net.ipv4.tcp_fin_timeout", "45")]);
    let pods = [
        pod("edge", "squid-0", "squid"),
        pod("edge", "nginx-0", "nginx"),
        pod("other", "squid-1", "squid"),
        pod("other", "redis-0", "redis"),
    ];
    let plan = plan_pods(
        &node(),
        [&squid, &all_edge, &host],
        &pods,
        &Policy::default(),
    );
    assert!(plan.selector_errors.is_empty());
    let by_name: BTreeMap<&str, &PodPlan> =
        plan.pods.iter().map(|p| (p.pod.name.as_str(), p)).collect();
    assert_eq!(
        by_name.keys().copied().collect::<Vec<_>>(),
        vec!["nginx-0", "squid-0", "squid-1"],
        "redis-0 is selected by no pod profile; the host profile selects no pod"
    );
    assert_eq!(
        keys(by_name["squid-0"]),
        vec![
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("net.ipv4.tcp_fin_timeout", "15"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ]
    );
    assert_eq!(by_name["squid-0"].merged.overridden.len(), 1);
    assert_eq!(by_name["squid-0"].merged.overridden[0].profile, "edge");
    assert_eq!(
        keys(by_name["nginx-0"]),
        vec![
            ("net.ipv4.tcp_fin_timeout", "30"),
            ("net.ipv4.tcp_tw_reuse", "1")
        ]
    );
    assert_eq!(
        keys(by_name["squid-1"]),
        vec![
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("net.ipv4.tcp_fin_timeout", "15"),
        ]
    );
}

#[test]
fn host_network_finished_and_other_node_pods_are_left_alone() {
    let mut squid = for_pods(
        profile("squid", 0, &[("net.ipv4.tcp_fin_timeout", "15")]),
        "squid",
    );
    let mut host_net = pod("edge", "hn", "squid");
    host_net.host_network = true;
    let mut done = pod("edge", "done", "squid");
    done.phase = Some("Succeeded".into());
    let plan = plan_pods(&node(), [&squid], &[host_net, done], &Policy::default());
    assert!(plan.pods.is_empty(), "{plan:?}");
    // The node selector still decides which nodes' pods count.
    let plan_one_pod = |squid: &NodeTuningProfile| {
        plan_pods(
            &node(),
            [squid],
            &[pod("edge", "s", "squid")],
            &Policy::default(),
        )
    };
    squid.spec.node_selector = selector::from_pairs(&["role=db".into()]).expect("pair");
    let plan = plan_one_pod(&squid);
    assert!(plan.pods.is_empty(), "{plan:?}");
    // A profile being deleted selects nothing, so its keys get restored.
    squid.spec.node_selector = None;
    squid = squid.deleted_at(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let plan = plan_one_pod(&squid);
    assert!(plan.pods.is_empty(), "{plan:?}");
}

#[test]
fn keys_outside_the_network_namespace_and_policy_refusals_are_refused_per_pod() {
    let squid = for_pods(
        profile(
            "squid",
            0,
            &[
                ("vm.swappiness", "10"),
                ("net.core.rmem_max", "1048576"),
                ("kernel.shmmax", "1000"),
                ("kernel.core_pattern", "|/bin/sh"),
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.ipv4.tcp_fin_timeout", "15"),
            ],
        ),
        "squid",
    );
    let policy = SysctlPolicy {
        denied_keys: vec![r"net\.ipv4\.tcp_tw_.*".into()],
        ..Default::default()
    }
    .compile()
    .expect("policy");
    let plan = plan_pods(&node(), [&squid], &[pod("edge", "s", "squid")], &policy);
    let p = &plan.pods[0];
    assert_eq!(keys(p), vec![("net.ipv4.tcp_fin_timeout", "15")]);
    let refused: BTreeMap<&str, (KeyState, &str)> = p
        .refused
        .iter()
        .map(|r| (r.key.as_str(), (r.state, r.message.as_str())))
        .collect();
    for (key, scope) in [
        ("vm.swappiness", "Node"),
        ("net.core.rmem_max", "Node"),
        ("kernel.shmmax", "IPCNamespace"),
    ] {
        let (state, msg) = refused[key];
        assert_eq!(state, KeyState::Denied, "{key}");
        assert!(
            msg.contains(key) && msg.contains(&format!("scope {scope}")) && msg.contains("never"),
            "{key}: {msg}"
        );
    }
    assert_eq!(refused["kernel.core_pattern"].0, KeyState::Denied);
    assert!(refused["net.ipv4.tcp_tw_reuse"].1.contains("deniedKeys"));
}

#[test]
fn the_pods_own_sysctls_win_and_a_different_value_is_a_conflict() {
    let squid = for_pods(
        profile(
            "squid",
            0,
            &[
                ("net.ipv4.tcp_fin_timeout", "15"),
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ],
        ),
        "squid",
    );
    let mut p = pod("edge", "squid-0", "squid");
    p.sysctls = [
        ("net/ipv4/tcp_fin_timeout", "30"),
        ("net.ipv4.ip_local_port_range", "1024\t65000"),
        ("not a key", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let plan = plan_pods(&node(), [&squid], &[p], &Policy::default());
    let p = &plan.pods[0];
    assert_eq!(keys(p), vec![("net.ipv4.tcp_tw_reuse", "1")]);
    let owned: BTreeMap<&str, &PodOwned> =
        p.pod_owned.iter().map(|o| (o.key.as_str(), o)).collect();
    assert!(owned["net.ipv4.ip_local_port_range"].agrees());
    let fin = owned["net.ipv4.tcp_fin_timeout"];
    assert!(!fin.agrees());
    let msg = fin.message(&p.pod);
    assert!(
        msg.contains("edge/squid-0") && msg.contains("=30") && msg.contains("wants 15"),
        "{msg}"
    );
}

#[test]
fn a_broken_pod_selector_selects_nothing_and_is_reported_once() {
    let mut bad = profile("bad", 0, &[("net.ipv4.tcp_fin_timeout", "15")]);
    bad.spec.pod_selector = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "Gt".into(),
                    values: Some(vec!["1".into()]),
                },
            ]),
            ..Default::default()
        },
    );
    let pods = [pod("a", "one", "x"), pod("a", "two", "y")];
    let plan = plan_pods(&node(), [&bad], &pods, &Policy::default());
    assert!(plan.pods.is_empty());
    assert_eq!(plan.selector_errors.len(), 1);
    assert_eq!(plan.selector_errors[0].0, "bad");
}

fn held(uid: &str, inode: u64, key: &str, profile: &str) -> HeldPodKey {
    HeldPodKey {
        netns: PodNetns {
            uid: uid.into(),
            inode,
        },
        key: key.into(),
        profile: Some(profile.into()),
    }
}

#[test]
fn originals_are_restored_for_living_unselected_pods_and_dropped_for_gone_ones() {
    let squid = for_pods(
        profile("squid", 0, &[("net.ipv4.tcp_fin_timeout", "15")]),
        "squid",
    );
    let mut keep = for_pods(
        profile("keep", 0, &[("net.ipv4.tcp_tw_reuse", "1")]),
        "none",
    );
    keep.spec.restore_on_removal = false;
    // squid-0 still selected; squid-1 relabelled (alive, unselected); uid-gone deleted;
    // uid-recreated got a new sandbox (new inode).
    let mut relabelled = pod("edge", "squid-1", "squid");
    relabelled.labels = labels(&[("app", "other")]);
    let pods = [pod("edge", "squid-0", "squid"), relabelled];
    let plan = plan_pods(&node(), [&squid, &keep], &pods, &Policy::default());
    let living: BTreeMap<String, u64> = [
        ("uid-squid-0".to_string(), 10),
        ("uid-squid-1".to_string(), 11),
        ("uid-recreated".to_string(), 99),
    ]
    .into();
    let ledger = [
        held("uid-squid-0", 10, "net.ipv4.tcp_fin_timeout", "squid"),
        held("uid-squid-1", 11, "net.ipv4.tcp_fin_timeout", "squid"),
        held("uid-squid-1", 11, "net.ipv4.tcp_tw_reuse", "keep"),
        held("uid-gone", 12, "net.ipv4.tcp_fin_timeout", "squid"),
        held("uid-recreated", 13, "net.ipv4.tcp_fin_timeout", "squid"),
    ];
    let decisions: Vec<(String, String, RestoreDecision)> =
        restore_decisions(&ledger, &living, &plan.pods, &[&squid, &keep])
            .into_iter()
            .map(|(h, d)| (h.netns.uid, h.key, d))
            .collect();
    let want = |uid: &str, key: &str, d| (uid.to_string(), key.to_string(), d);
    assert_eq!(
        decisions,
        vec![
            want(
                "uid-squid-1",
                "net.ipv4.tcp_fin_timeout",
                RestoreDecision::Restore
            ),
            want(
                "uid-squid-1",
                "net.ipv4.tcp_tw_reuse",
                RestoreDecision::Forget
            ),
            want(
                "uid-gone",
                "net.ipv4.tcp_fin_timeout",
                RestoreDecision::Drop
            ),
            want(
                "uid-recreated",
                "net.ipv4.tcp_fin_timeout",
                RestoreDecision::Drop
            ),
        ]
    );
}

fn result(key: &str, state: KeyState, message: Option<&str>) -> KeyResult {
    KeyResult {
        key: key.into(),
        desired: None,
        previous: None,
        actual: None,
        original: None,
        scope: Scope::NetworkNamespace,
        optional: false,
        state,
        changed: false,
        message: message.map(str::to_string),
    }
}

#[test]
fn the_summary_counts_every_pod_and_names_a_bounded_few() {
    let squid = for_pods(
        profile(
            "squid",
            0,
            &[("net.ipv4.tcp_fin_timeout", "15"), ("vm.swappiness", "1")],
        ),
        "squid",
    );
    let mut pods: Vec<PodInfo> = (0..25)
        .map(|i| pod("edge", &format!("s{i:02}"), "squid"))
        .collect();
    pods[3].sysctls = [("net.ipv4.tcp_fin_timeout".to_string(), "60".to_string())].into();
    let plan = plan_pods(&node(), [&squid], &pods, &Policy::default());
    let fin = "net.ipv4.tcp_fin_timeout";
    // s00..s19 applied, s20..s23 failed, s24 not reached yet; s03 sets the key itself.
    let results: BTreeMap<String, Vec<KeyResult>> = (0..24)
        .filter(|i| *i != 3)
        .map(|i| {
            let r = if i < 20 {
                result(fin, KeyState::Applied, None)
            } else {
                result(fin, KeyState::Failed, Some("read back 60"))
            };
            (format!("uid-s{i:02}"), vec![r])
        })
        .collect();
    let summary = summarise(&plan.pods, &results);
    let by_key: BTreeMap<&str, &crate::api::PodSysctlEntry> =
        summary.iter().map(|e| (e.key.as_str(), e)).collect();
    let f = by_key[fin];
    assert_eq!(
        (f.pods, f.applied, f.conflicts, f.failed),
        (25, 19, 1, 4),
        "{f:?}"
    );
    assert_eq!(f.named.len(), 5);
    assert_eq!(f.named[0].name, "s03");
    assert_eq!(f.named[0].state, KeyState::Overridden);
    assert!(f.named[1..].iter().all(|n| n.message == "read back 60"));
    let vm = by_key["vm.swappiness"];
    assert_eq!((vm.pods, vm.failed), (25, 25));
    assert_eq!(vm.named.len(), crate::api::report::MAX_NAMED_PODS);
    assert!(vm.named.iter().all(|n| n.state == KeyState::Denied));
}

#[test]
fn the_host_report_names_pod_profiles_keys_as_not_applied() {
    let squid = for_pods(
        profile(
            "squid",
            0,
            &[
                ("net/ipv4/tcp_fin_timeout", "15"),
                ("vm.swappiness", "10"),
                ("Bad..key", "1"),
            ],
        ),
        "squid",
    );
    let host = profile("host", 0, &[("net.ipv4.tcp_tw_reuse", "1")]);
    let entries =
        crate::podtune::not_handled(&[&squid, &host], crate::podtune::summary::NOT_HANDLED_YET);
    let by_key: BTreeMap<&str, &crate::api::SysctlEntry> =
        entries.iter().map(|e| (e.key.as_str(), e)).collect();
    assert_eq!(by_key.len(), 3, "only the pod profile's keys: {entries:?}");
    let fin = by_key["net.ipv4.tcp_fin_timeout"];
    assert_eq!(fin.profile.as_deref(), Some("squid"));
    assert_eq!(fin.state, KeyState::Unsupported);
    assert!(fin.is_failure());
    let message = |e: &crate::api::SysctlEntry| e.message.clone().unwrap_or_default();
    assert!(message(fin).contains("never in the host's"), "{fin:?}");
    let vm = by_key["vm.swappiness"];
    assert_eq!(vm.state, KeyState::Denied);
    assert!(
        message(vm).contains("scope Node, not NetworkNamespace"),
        "{vm:?}"
    );
    assert_eq!(by_key["Bad..key"].state, KeyState::Invalid);
}
