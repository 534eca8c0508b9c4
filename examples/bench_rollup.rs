//! Benchmark: the controller's per-profile roll-up and the agent's merge at cluster scale, pure
//! (no API server), to show they grow linearly with nodes and stay small.
//!
//! `cargo run --release --example bench_rollup [-- ROUNDS [NODES...]]` (default 7 rounds; 1000,
//! 5000 and 20000 nodes). Each node has a report of 3 keys per profile and TCP counts; 5
//! profiles select half of the nodes each: median time to roll up all 5 profiles, time per
//! node, and the size of one profile's status as JSON. As in the controller's pass, nodes are
//! joined to their reports once (`rollup::Joined`) and the 5 roll-ups are tallied in one walk
//! over the nodes (`rollup::rollup_all`). The roll-up reads what the controller's
//! cache keeps (`controller::cache::ReportDigest`), made as the controller makes it: each
//! report goes through JSON (as it comes off the watch) and is reduced to its digest, the
//! report dropped, in node order; an argument `cached` (earlier runs' second mode) is accepted
//! and changes nothing. Compare the per-node ratios within one run; the machine is noisy.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use nodetune::api::{
    AppliedProfile, KeyState, Mode, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport,
    NodeTuningReportSpec, NodeTuningReportStatus, Scope, SysctlEntry, TcpCounts,
};
use nodetune::controller::cache::{Interner, ReportDigest, Reports};
use nodetune::controller::rollup::{Joined, RollupInput, rollup_all};
use nodetune::plan::NodeLabels;

fn profile(i: usize) -> NodeTuningProfile {
    let mut p = NodeTuningProfile::new(
        &format!("profile-{i}"),
        NodeTuningProfileSpec {
            node_selector: nodetune::selector::from_pairs(&[format!("half={}", i % 2)])
                .ok()
                .flatten(),
            sysctls: (0..3)
                .map(|k| (format!("net.ipv4.key_{i}_{k}"), "1".into()))
                .collect(),
            restore_on_removal: true,
            ..Default::default()
        },
    );
    p.metadata.generation = Some(1);
    p
}

fn report(node: &str, n: usize, profiles: &[NodeTuningProfile]) -> NodeTuningReport {
    let mut r = NodeTuningReport::new(
        node,
        NodeTuningReportSpec {
            node_name: node.into(),
        },
    );
    let mine: Vec<&NodeTuningProfile> = profiles
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == n % 2)
        .map(|(_, p)| p)
        .collect();
    let states = ["ESTABLISHED", "TIME_WAIT", "LISTEN"];
    r.status = Some(NodeTuningReportStatus {
        profiles: mine
            .iter()
            .map(|p| AppliedProfile {
                name: p.metadata.name.clone().unwrap_or_default(),
                generation: 1,
                mode: Mode::Enforce,
                overridden_keys: vec![],
                revision: None,
            })
            .collect(),
        sysctls: mine
            .iter()
            .flat_map(|p| p.spec.sysctls.keys().map(move |k| (p, k)))
            .map(|(p, k)| SysctlEntry {
                key: k.clone(),
                desired: Some("1".into()),
                actual: Some("1".into()),
                original: Some("0".into()),
                profile: p.metadata.name.clone(),
                scope: Scope::NetworkNamespace,
                optional: false,
                // One node in a hundred fails, so the unhealthy-first list has work to do.
                state: if n.is_multiple_of(100) {
                    KeyState::Failed
                } else {
                    KeyState::Applied
                },
                message: None,
            })
            .collect(),
        tcp: TcpCounts {
            source: "netlink".into(),
            total: states
                .iter()
                .map(|s| (s.to_string(), (n % 50) as i64))
                .collect(),
            ..Default::default()
        },
        last_report_time: Some(Time(Timestamp::UNIX_EPOCH)),
        ..Default::default()
    });
    r
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let mut sizes: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|a| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1000, 5000, 20000];
    }
    println!("reports as the controller caches them (digests)");
    let profiles: Vec<NodeTuningProfile> = (0..5).map(profile).collect();
    println!(
        "{:>7} {:>14} {:>14} {:>16} {:>14}",
        "nodes", "pass 5 (ms)", "join+select", "per node (µs)", "status bytes"
    );
    let mut base_per_node = None;
    for n_nodes in sizes {
        let names: Vec<String> = (0..n_nodes).map(|n| format!("node-{n:05}")).collect();
        let nodes: NodeLabels =
            nodetune::plan::owned_node_labels(names.iter().enumerate().map(|(n, name)| {
                (
                    name.clone(),
                    BTreeMap::from([("half".to_string(), (n % 2).to_string())]),
                )
            }));
        let mut interned = Interner::default();
        let reports: Reports = names
            .iter()
            .enumerate()
            .filter_map(|(n, name)| {
                let json = serde_json::to_vec(&report(name, n, &profiles)).ok()?;
                let r: NodeTuningReport = serde_json::from_slice(&json).ok()?;
                let d = ReportDigest::of(&r, &mut interned)?;
                Some((Arc::from(name.as_str()), Arc::new(d)))
            })
            .collect();
        let (mut times, mut selecting) = (Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            // The join and the selection are part of the controller's pass, so they are timed
            // too (and apart): nodes joined to their reports once, then each profile's rows.
            let joined = Joined::new(&nodes, &reports);
            let selection = joined.selection(&profiles);
            selecting.push(t.elapsed().as_secs_f64());
            // All profiles in one walk over the nodes, as the controller's pass does.
            let inputs: Vec<RollupInput<'_>> = profiles
                .iter()
                .filter_map(|p| {
                    let rows = selection.get(p.metadata.name.as_deref().unwrap_or_default())?;
                    Some(RollupInput {
                        profile: p,
                        previous: None,
                        rows,
                    })
                })
                .collect();
            for s in rollup_all(&inputs, &joined, Timestamp::UNIX_EPOCH) {
                size = serde_json::to_vec(&s).map(|v| v.len()).unwrap_or(0);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (median, selection) = (median(times), median(selecting));
        let per_node = median / n_nodes as f64 * 1e6;
        let ratio = base_per_node.map(|b| per_node / b).unwrap_or(1.0);
        base_per_node.get_or_insert(per_node);
        println!(
            "{n_nodes:>7} {:>14.2} {:>14.2} {per_node:>16.3} {size:>14}   per-node ratio to 1000: {ratio:.2}",
            median * 1e3,
            selection * 1e3
        );
    }
}
