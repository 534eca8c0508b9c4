//! `nodetune uninstall`: takes nodetune off a cluster without hanging and without leaving nodes
//! tuned by surprise. Run by the chart's pre-delete hook (controller and agents still running:
//! they put the originals back), or by hand with `--force` when the controller is already gone
//! (then nothing can restore: finalizers and labels are released and the nodes that keep tuned
//! values are named).
//!
//! Steps: delete every NodeTuningProfile; wait (bounded) until their finalizers are released;
//! release what is left; wait (bounded) for the controller to withdraw the agents (node label
//! `nodetune.dev/agent`), remove leftover labels; with `--force` delete the agent DaemonSet;
//! wait for the agent pods to be gone; delete the NodeTuningReports, after reading from them
//! which nodes still hold originals.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::api::{NodeTuningProfile, NodeTuningReport};
use crate::controller::config::parse_duration;
use crate::controller::finalizer::FINALIZER;
use crate::controller::render::{AGENT_NODE_LABEL, DAEMONSET_NAME};

const FIELD_MANAGER: &str = "nodetune-uninstall";
const POLL: Duration = Duration::from_secs(2);
/// Progress lines at most this often while waiting.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// Remove every nodetune object from the cluster, restoring nodes first when the controller runs.
#[derive(Clone, Debug, Args)]
pub struct UninstallArgs {
    /// Namespace of the agent DaemonSet and its pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodetune-system")]
    pub namespace: String,

    /// How long to wait for the controller and agents to restore the nodes before releasing
    /// what is left.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub timeout: Duration,

    /// The controller is gone: do not wait for restores; release finalizers and labels, delete
    /// the agent DaemonSet, and name the nodes that keep tuned values.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("cannot reach the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> UninstallError {
    let action = action.into();
    move |source| UninstallError::Api { action, source }
}

/// What an uninstall left behind: nodes whose ledger still held original values (so their
/// tuned values stay), each with those keys.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub nodes_keeping_values: BTreeMap<String, Vec<String>>,
    pub finalizers_released: Vec<String>,
}

/// Nodes whose report lists held originals: nodetune changed those keys and did not put them
/// back. Pure.
pub fn nodes_keeping_values(reports: &[NodeTuningReport]) -> BTreeMap<String, Vec<String>> {
    reports
        .iter()
        .filter_map(|r| {
            let held = &r.status.as_ref()?.held_originals;
            (!held.is_empty()).then(|| {
                let mut keys = held.clone();
                keys.sort();
                (r.spec.node_name.clone(), keys)
            })
        })
        .collect()
}

/// The finalizer list without nodetune's own.
fn without_ours(finalizers: &[String]) -> Vec<String> {
    finalizers
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect()
}

fn manager() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

fn say(msg: impl AsRef<str>) {
    println!("uninstall: {}", msg.as_ref());
}

/// Polls `check` until it returns an empty list or `deadline` passes; returns what is left.
async fn wait_until_empty<F, Fut>(
    what: &str,
    deadline: Instant,
    mut check: F,
) -> Result<Vec<String>, UninstallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, UninstallError>>,
{
    let mut said = Instant::now();
    loop {
        let left = check().await?;
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        if said.elapsed() >= SAY_EVERY {
            say(format!(
                "waiting for {} {what}: {}",
                left.len(),
                left.join(", ")
            ));
            said = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn run(args: UninstallArgs) -> Result<Outcome, UninstallError> {
    let client = crate::watch::client()
        .await
        .map_err(UninstallError::Client)?;
    run_with_client(args, client).await
}

pub async fn run_with_client(
    args: UninstallArgs,
    client: Client,
) -> Result<Outcome, UninstallError> {
    let deadline = Instant::now() + args.timeout;
    let profiles = Api::<NodeTuningProfile>::all(client.clone());
    let reports = Api::<NodeTuningReport>::all(client.clone());
    let nodes = Api::<Node>::all(client.clone());
    let mut outcome = Outcome::default();

    // 1. Delete every profile: the controller and agents restore the originals, then release
    //    each finalizer.
    let list = profiles
        .list(&ListParams::default())
        .await
        .map_err(api_err("list NodeTuningProfiles"))?;
    for p in &list.items {
        let name = p.name_any();
        match profiles.delete(&name, &DeleteParams::default()).await {
            Ok(_) => say(format!("deleted NodeTuningProfile {name}")),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("delete NodeTuningProfile {name}"))(e)),
        }
    }
    if list.items.is_empty() {
        say("no NodeTuningProfiles");
    }

    // 2. Wait for the restores (not with --force: nobody is left to do them).
    let wait_until = if args.force { Instant::now() } else { deadline };
    let left = wait_until_empty("profiles to finish restoring", wait_until, || async {
        Ok(profiles
            .list(&ListParams::default())
            .await
            .map_err(api_err("list NodeTuningProfiles"))?
            .items
            .iter()
            .map(|p| p.name_any())
            .collect())
    })
    .await?;

    // 3. Release what is left (timeout, or --force).
    for name in left {
        let Ok(p) = profiles.get(&name).await else {
            continue;
        };
        let finalizers = without_ours(p.finalizers());
        let patch = json!({"metadata": {"finalizers": finalizers,
                                        "resourceVersion": p.resource_version()}});
        match profiles
            .patch(&name, &manager(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                say(format!(
                    "released the finalizer of NodeTuningProfile {name} without a confirmed restore"
                ));
                outcome.finalizers_released.push(name);
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("release the finalizer of {name}"))(e)),
        }
    }

    // 4. The controller removes the agent label once a node is restored; remove the rest.
    let labelled = || async {
        Ok(nodes
            .list(&ListParams::default().labels(AGENT_NODE_LABEL))
            .await
            .map_err(api_err("list nodes"))?
            .items
            .iter()
            .map(|n| n.name_any())
            .collect::<Vec<_>>())
    };
    let wait_until = if args.force {
        Instant::now()
    } else {
        deadline.max(Instant::now() + Duration::from_secs(10))
    };
    let left = wait_until_empty("nodes to lose the agent label", wait_until, labelled).await?;
    for node in left {
        let patch = json!({"metadata": {"labels": {AGENT_NODE_LABEL: null}}});
        match nodes.patch(&node, &manager(), &Patch::Merge(&patch)).await {
            Ok(_) => say(format!(
                "removed the label {AGENT_NODE_LABEL} from node {node}"
            )),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("unlabel node {node}"))(e)),
        }
    }

    // 5. With the controller gone nothing owns the agents any more.
    if args.force {
        let ds = Api::<DaemonSet>::namespaced(client.clone(), &args.namespace);
        match ds.delete(DAEMONSET_NAME, &DeleteParams::default()).await {
            Ok(_) => say(format!(
                "deleted DaemonSet {}/{DAEMONSET_NAME}",
                args.namespace
            )),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err("delete the agent DaemonSet")(e)),
        }
    }

    // 6. Agents gone (an exiting agent writes its report once more), then the reports.
    let pods = Api::<Pod>::namespaced(client.clone(), &args.namespace);
    let left = wait_until_empty(
        "agent pods to stop",
        deadline.max(Instant::now() + Duration::from_secs(60)),
        || async {
            Ok(pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                .await
                .map_err(api_err("list agent pods"))?
                .items
                .iter()
                .map(|p| p.name_any())
                .collect())
        },
    )
    .await?;
    if !left.is_empty() {
        say(format!(
            "agent pods still running (their reports may come back): {}",
            left.join(", ")
        ));
    }
    let list = reports
        .list(&ListParams::default())
        .await
        .map_err(api_err("list NodeTuningReports"))?;
    outcome.nodes_keeping_values = nodes_keeping_values(&list.items);
    for r in &list.items {
        let name = r.name_any();
        match reports.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("delete NodeTuningReport {name}"))(e)),
        }
    }
    if !list.items.is_empty() {
        say(format!("deleted {} NodeTuningReport(s)", list.items.len()));
    }

    if outcome.nodes_keeping_values.is_empty() {
        say("done: every node has its original values");
    } else {
        for (node, keys) in &outcome.nodes_keeping_values {
            say(format!(
                "node {node} keeps tuned values for {} (the originals are in its ledger: \
                 run `nodetune restore --local` on that node)",
                keys.join(", ")
            ));
        }
        say("done, but the nodes above keep tuned values");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeTuningReportSpec, NodeTuningReportStatus};

    fn report(node: &str, held: &[&str]) -> NodeTuningReport {
        let mut r = NodeTuningReport::new(
            node,
            NodeTuningReportSpec {
                node_name: node.into(),
            },
        );
        r.status = Some(NodeTuningReportStatus {
            held_originals: held.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        r
    }

    #[test]
    fn only_nodes_holding_originals_keep_values() {
        let reports = [
            report("a", &[]),
            report("b", &["net.ipv4.tcp_tw_reuse", "net.core.somaxconn"]),
            NodeTuningReport::new(
                "c",
                NodeTuningReportSpec {
                    node_name: "c".into(),
                },
            ),
        ];
        let keep = nodes_keeping_values(&reports);
        assert_eq!(
            keep.into_iter().collect::<Vec<_>>(),
            vec![(
                "b".to_string(),
                vec![
                    "net.core.somaxconn".to_string(),
                    "net.ipv4.tcp_tw_reuse".to_string()
                ]
            )]
        );
    }

    #[test]
    fn releases_only_our_finalizer() {
        let list = vec!["other/x".to_string(), FINALIZER.to_string()];
        assert_eq!(without_ours(&list), vec!["other/x".to_string()]);
        assert!(without_ours(&[FINALIZER.to_string()]).is_empty());
    }
}
