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
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};

use crate::api::{NodeTuningProfile, NodeTuningReport};
use crate::controller::writes::{FinalizerPatch, is_not_found, unlabel_node};
use crate::names::{AGENT_NODE_LABEL, AGENT_POD_SELECTOR, DAEMONSET_NAME, UNINSTALL_FIELD_MANAGER};
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
    #[arg(long, default_value = "3m", value_parser = crate::duration::parse)]
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
    let mut u = Uninstall::new(args, client);
    u.delete_profiles().await?;
    let left = u.wait_for_restores().await?;
    u.release_finalizers(left).await?;
    u.remove_agent_labels().await?;
    if u.args.force {
        u.delete_daemonset().await?;
    }
    u.wait_for_agents().await?;
    u.delete_reports().await?;
    u.summarize();
    Ok(u.outcome)
}

/// One uninstall run: its APIs, deadline and what it has found so far.
struct Uninstall {
    args: UninstallArgs,
    deadline: Instant,
    client: Client,
    profiles: Api<NodeTuningProfile>,
    nodes: Api<Node>,
    outcome: Outcome,
}

impl Uninstall {
    fn new(args: UninstallArgs, client: Client) -> Self {
        Self {
            deadline: Instant::now() + args.timeout,
            profiles: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            client,
            args,
            outcome: Outcome::default(),
        }
    }

    /// How long to wait for others (controller, agents): not at all with --force, since
    /// nobody is left to do the work; at least `floor` otherwise.
    fn wait_until(&self, floor: Duration) -> Instant {
        if self.args.force {
            Instant::now()
        } else {
            self.deadline.max(Instant::now() + floor)
        }
    }

    async fn profile_names(&self) -> Result<Vec<String>, UninstallError> {
        let list = self
            .profiles
            .list(&ListParams::default())
            .await
            .map_err(api_err("list NodeTuningProfiles"))?;
        Ok(list.items.iter().map(|p| p.name_any()).collect())
    }

    /// Step 1: delete every profile; the controller and agents restore the originals, then
    /// release each finalizer.
    async fn delete_profiles(&self) -> Result<(), UninstallError> {
        let names = self.profile_names().await?;
        if names.is_empty() {
            say("no NodeTuningProfiles");
        }
        for name in names {
            match self.profiles.delete(&name, &DeleteParams::default()).await {
                Ok(_) => say(format!("deleted NodeTuningProfile {name}")),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_err(format!("delete NodeTuningProfile {name}"))(e)),
            }
        }
        Ok(())
    }

    /// Step 2: wait for the restores; returns the profiles still there.
    async fn wait_for_restores(&self) -> Result<Vec<String>, UninstallError> {
        let until = self.wait_until(Duration::ZERO);
        wait_until_empty("profiles to finish restoring", until, || {
            self.profile_names()
        })
        .await
    }

    /// Step 3: release the finalizers of what is left (timeout, or --force).
    async fn release_finalizers(&mut self, left: Vec<String>) -> Result<(), UninstallError> {
        for name in left {
            let Ok(p) = self.profiles.get(&name).await else {
                continue;
            };
            match FinalizerPatch::release(&p)
                .send(&self.profiles, UNINSTALL_FIELD_MANAGER)
                .await
            {
                Ok(()) => {
                    say(format!(
                        "released the finalizer of NodeTuningProfile {name} without a confirmed restore"
                    ));
                    self.outcome.finalizers_released.push(name);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_err(format!("release the finalizer of {name}"))(e)),
            }
        }
        Ok(())
    }

    async fn labelled_nodes(&self) -> Result<Vec<String>, UninstallError> {
        let list = self
            .nodes
            .list(&ListParams::default().labels(AGENT_NODE_LABEL))
            .await
            .map_err(api_err("list nodes"))?;
        Ok(list.items.iter().map(|n| n.name_any()).collect())
    }

    /// Step 4: the controller removes the agent label once a node is restored; remove the rest.
    async fn remove_agent_labels(&self) -> Result<(), UninstallError> {
        let until = self.wait_until(Duration::from_secs(10));
        let left = wait_until_empty("nodes to lose the agent label", until, || {
            self.labelled_nodes()
        })
        .await?;
        for node in left {
            match unlabel_node(&self.nodes, &node, UNINSTALL_FIELD_MANAGER).await {
                Ok(()) => say(format!(
                    "removed the label {AGENT_NODE_LABEL} from node {node}"
                )),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_err(format!("unlabel node {node}"))(e)),
            }
        }
        Ok(())
    }

    /// Step 5 (--force): with the controller gone nothing owns the agents any more.
    async fn delete_daemonset(&self) -> Result<(), UninstallError> {
        let ds = Api::<DaemonSet>::namespaced(self.client.clone(), &self.args.namespace);
        match ds.delete(DAEMONSET_NAME, &DeleteParams::default()).await {
            Ok(_) => say(format!(
                "deleted DaemonSet {}/{DAEMONSET_NAME}",
                self.args.namespace
            )),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err("delete the agent DaemonSet")(e)),
        }
        Ok(())
    }

    /// Step 6: the agents gone (an exiting agent writes its report once more).
    async fn wait_for_agents(&self) -> Result<(), UninstallError> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.args.namespace);
        let list_agents = || async {
            let list = pods
                .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
                .await
                .map_err(api_err("list agent pods"))?;
            Ok(list.items.iter().map(|p| p.name_any()).collect())
        };
        let until = self.deadline.max(Instant::now() + Duration::from_secs(60));
        let left = wait_until_empty("agent pods to stop", until, list_agents).await?;
        if !left.is_empty() {
            say(format!(
                "agent pods still running (their reports may come back): {}",
                left.join(", ")
            ));
        }
        Ok(())
    }

    /// Step 7: read from the reports which nodes still hold originals, then delete them.
    async fn delete_reports(&mut self) -> Result<(), UninstallError> {
        let reports = Api::<NodeTuningReport>::all(self.client.clone());
        let list = reports
            .list(&ListParams::default())
            .await
            .map_err(api_err("list NodeTuningReports"))?;
        self.outcome.nodes_keeping_values = nodes_keeping_values(&list.items);
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
        Ok(())
    }

    fn summarize(&self) {
        if self.outcome.nodes_keeping_values.is_empty() {
            say("done: every node has its original values");
            return;
        }
        for (node, keys) in &self.outcome.nodes_keeping_values {
            say(format!(
                "node {node} keeps tuned values for {} (the originals are in its ledger: \
                 run `nodetune restore --local` on that node)",
                keys.join(", ")
            ));
        }
        say("done, but the nodes above keep tuned values");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_holding_originals_keep_values() {
        let reports = [
            NodeTuningReport::test("a").holding(&[]),
            NodeTuningReport::test("b").holding(&["net.ipv4.tcp_tw_reuse", "net.core.somaxconn"]),
            // No status yet: a node whose agent has not reported.
            NodeTuningReport::test("c"),
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
}
