//! `nodetune top` (also `kubectl nodetune top`, installed as `kubectl-nodetune`): the pods and
//! nodes with the most TIME_WAIT or CLOSE_WAIT sockets across the cluster, read from the
//! NodeTuningReports, like `kubectl top`. Ranking and printing are pure; the one API call is a
//! list of the reports.
//!
//! Pods come from each report's `status.pods.top` (each node's 10 pods with the most
//! TIME_WAIT), so ranking by CLOSE_WAIT sees only those pods.
use std::cmp::Reverse;

use clap::{Args, ValueEnum};
use kube::Api;
use serde::Serialize;

use crate::api::NodeTuningReport;

/// What to rank by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    #[default]
    TimeWait,
    CloseWait,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum TopOutput {
    #[default]
    Table,
    Json,
}

#[derive(Clone, Debug, Args)]
pub struct TopArgs {
    /// Rank by TIME_WAIT (default) or CLOSE_WAIT.
    #[arg(long, value_enum, default_value_t = SortBy::TimeWait)]
    pub sort_by: SortBy,
    /// Rows per list.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    #[arg(short, long, value_enum, default_value_t = TopOutput::Table)]
    pub output: TopOutput,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("connecting to the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("listing NodeTuningReports: {0}")]
    List(#[source] kube::Error),
    #[error("printing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRow {
    pub node: String,
    pub namespace: String,
    /// The pod's name, or its UID when the agent had not named it.
    pub pod: String,
    pub time_wait: i64,
    pub close_wait: i64,
    pub total: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub node: String,
    /// The node's own namespace (hostNetwork pods included).
    pub host_time_wait: i64,
    pub host_close_wait: i64,
    /// All pod namespaces of the node.
    pub pods_time_wait: i64,
    pub pods_close_wait: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TopView {
    pub pods: Vec<PodRow>,
    pub nodes: Vec<NodeRow>,
}

fn state(map: &std::collections::BTreeMap<String, i64>, name: &str) -> i64 {
    map.get(name).copied().unwrap_or_default()
}

/// The top `limit` pods and nodes by `by` (ties by total, then by name, so output is stable).
pub fn rank(reports: &[NodeTuningReport], by: SortBy, limit: usize) -> TopView {
    let mut view = TopView::default();
    for r in reports {
        let node = r.spec.node_name.clone();
        let Some(status) = &r.status else { continue };
        let pods = status.pods.as_ref();
        view.nodes.push(NodeRow {
            node: node.clone(),
            host_time_wait: state(&status.tcp.total, "TIME_WAIT"),
            host_close_wait: state(&status.tcp.total, "CLOSE_WAIT"),
            pods_time_wait: pods.map_or(0, |p| p.time_wait),
            pods_close_wait: pods.map_or(0, |p| state(&p.states, "CLOSE_WAIT")),
        });
        for p in pods.map(|p| p.top.as_slice()).unwrap_or_default() {
            view.pods.push(PodRow {
                node: node.clone(),
                namespace: p.namespace.clone(),
                pod: if p.name.is_empty() {
                    p.uid.clone()
                } else {
                    p.name.clone()
                },
                time_wait: p.time_wait,
                close_wait: state(&p.states, "CLOSE_WAIT"),
                total: p.total,
            });
        }
    }
    let pod_key = |p: &PodRow| match by {
        SortBy::TimeWait => (p.time_wait, p.total),
        SortBy::CloseWait => (p.close_wait, p.total),
    };
    view.pods.sort_by(|a, b| {
        Reverse(pod_key(a))
            .cmp(&Reverse(pod_key(b)))
            .then_with(|| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)))
    });
    let node_key = |n: &NodeRow| match by {
        SortBy::TimeWait => n.host_time_wait.saturating_add(n.pods_time_wait),
        SortBy::CloseWait => n.host_close_wait.saturating_add(n.pods_close_wait),
    };
    view.nodes.sort_by(|a, b| {
        Reverse(node_key(a))
            .cmp(&Reverse(node_key(b)))
            .then(a.node.cmp(&b.node))
    });
    view.pods.truncate(limit);
    view.nodes.truncate(limit);
    view
}

/// Names are user input (pod names are not, node names hardly): control characters escaped.
fn shown(s: &str) -> String {
    s.chars().flat_map(char::escape_default).collect()
}

pub fn render_table(view: &TopView) -> String {
    let mut out = format!(
        "{:<24} {:<40} {:<24} {:>9} {:>10} {:>7}\n",
        "NAMESPACE", "POD", "NODE", "TIME_WAIT", "CLOSE_WAIT", "TOTAL"
    );
    for p in &view.pods {
        out.push_str(&format!(
            "{:<24} {:<40} {:<24} {:>9} {:>10} {:>7}\n",
            shown(&p.namespace),
            shown(&p.pod),
            shown(&p.node),
            p.time_wait,
            p.close_wait,
            p.total
        ));
    }
    out.push_str(&format!(
        "\n{:<24} {:>14} {:>15} {:>14} {:>15}\n",
        "NODE", "HOST_TIME_WAIT", "HOST_CLOSE_WAIT", "PODS_TIME_WAIT", "PODS_CLOSE_WAIT"
    ));
    for n in &view.nodes {
        out.push_str(&format!(
            "{:<24} {:>14} {:>15} {:>14} {:>15}\n",
            shown(&n.node),
            n.host_time_wait,
            n.host_close_wait,
            n.pods_time_wait,
            n.pods_close_wait
        ));
    }
    out
}

/// Lists the reports and prints the ranking.
pub async fn run(args: &TopArgs) -> Result<String, TopError> {
    let client = crate::watch::client().await.map_err(TopError::Client)?;
    let reports = Api::<NodeTuningReport>::all(client)
        .list(&Default::default())
        .await
        .map_err(TopError::List)?;
    let view = rank(&reports.items, args.sort_by, args.limit);
    Ok(match args.output {
        TopOutput::Table => render_table(&view),
        TopOutput::Json => format!("{}\n", serde_json::to_string_pretty(&view)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeTuningReportSpec, PodTcp, PodsTcp};

    fn report(node: &str, host_tw: i64, pods: &[(&str, i64, i64)]) -> NodeTuningReport {
        let mut r = NodeTuningReport::test(node);
        let status = r.status_mut();
        status.tcp.total = [("TIME_WAIT".to_string(), host_tw)].into();
        status.pods = Some(PodsTcp {
            time_wait: pods.iter().map(|p| p.1).sum(),
            states: [("CLOSE_WAIT".to_string(), pods.iter().map(|p| p.2).sum())].into(),
            top: pods
                .iter()
                .map(|(name, tw, cw)| PodTcp {
                    namespace: "web".into(),
                    name: name.to_string(),
                    uid: format!("uid-{name}"),
                    time_wait: *tw,
                    total: tw + cw,
                    states: [("CLOSE_WAIT".to_string(), *cw)].into(),
                })
                .collect(),
            ..Default::default()
        });
        r
    }

    #[test]
    fn ranks_pods_and_nodes_across_the_cluster() {
        let reports = [
            report("node-a", 5, &[("squid-0", 1_478, 15), ("idle", 0, 0)]),
            report("node-b", 900, &[("nginx-1", 300, 40), ("", 7, 0)]),
            // Not named after its node yet, and no status.
            NodeTuningReport::new("fresh", NodeTuningReportSpec::default()),
        ];
        let v = rank(&reports, SortBy::TimeWait, 3);
        let pods: Vec<(&str, i64)> = v
            .pods
            .iter()
            .map(|p| (p.pod.as_str(), p.time_wait))
            .collect();
        assert_eq!(pods, [("squid-0", 1_478), ("nginx-1", 300), ("uid-", 7)]);
        assert_eq!(v.nodes[0].node, "node-a", "1,483 TIME_WAIT beats 1,207");
        assert_eq!(v.nodes[0].pods_time_wait, 1_478);

        let v = rank(&reports, SortBy::CloseWait, 1);
        assert_eq!((v.pods.len(), v.pods[0].pod.as_str()), (1, "nginx-1"));
        assert_eq!(v.nodes[0].node, "node-b");

        let text = render_table(&rank(&reports, SortBy::TimeWait, 10));
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.contains("squid-0") && l.contains("1478")),
            "{text}"
        );
    }

    #[test]
    fn control_characters_in_names_are_escaped() {
        let reports = [report("node-a", 0, &[("evil\u{1b}[2J", 1, 0)])];
        let text = render_table(&rank(&reports, SortBy::TimeWait, 10));
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("evil\\u{1b}[2J"), "{text}");
    }
}
