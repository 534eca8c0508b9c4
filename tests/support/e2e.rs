//! The end-to-end fixture every operator scenario shares: a control plane, simulated nodes,
//! the node shim and nodetune deployed from deploy/nodetune.yaml, with typed `Api`s, one
//! `await_condition` and the readers the scenarios check with. A test file says only which
//! nodes it wants and how its controller differs; waiting, applying and diagnostics are here.
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use nodetune::api::{NodeTuningProfile, NodeTuningReport, NodeTuningReportStatus};
use nodetune::names::AGENT_POD_SELECTOR;
use serde::de::DeserializeOwned;

use super::shim::ShimConfig;
use super::{Cluster, SimNode, deploy, kubectl, wait_for};

pub use super::deploy::NAMESPACE as NS;

/// Generous: the machine is small and shared; a step normally takes a few seconds.
pub const WAIT: Duration = Duration::from_secs(90);
pub const POLL: Duration = Duration::from_millis(250);
/// Field manager of the tests' own writes.
const FIELD_MANAGER: &str = "e2e-test";

/// How the node shim restarts a container that died.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Restarts {
    /// The shim's defaults (kubelet-like back-off).
    Default,
    /// Within a second, so a test can SIGKILL an agent many times.
    Quick,
}

/// A running cluster with nodetune deployed; dropping it tears the cluster down.
pub struct Env {
    pub cluster: Cluster,
    nodes: BTreeMap<String, SimNode>,
}

impl Env {
    /// Nodes `(name, role)`, the shim, and nodetune with the shipped controller Deployment
    /// shortened by `deploy::short_intervals`. `None` when the test is to be skipped.
    pub async fn start(test: &str, nodes: &[(&str, &str)]) -> Result<Option<Env>> {
        Self::start_with(test, nodes, Restarts::Default, deploy::short_intervals).await
    }

    /// As [`Env::start`], with the controller Deployment adjusted by `controller` instead.
    pub async fn start_with(
        test: &str,
        nodes: &[(&str, &str)],
        restarts: Restarts,
        controller: impl FnOnce(&mut Deployment) -> Result<()>,
    ) -> Result<Option<Env>> {
        let Some(bin) = super::cluster_prereqs(test) else {
            return Ok(None);
        };
        let cluster = Cluster::start(&bin).await?;
        let mut sims = BTreeMap::new();
        for (name, role) in nodes {
            let node = cluster
                .add_node(name, &[(super::fixtures::ROLE, role)])
                .await?;
            sims.insert(name.to_string(), node);
        }
        start_shim(&cluster, restarts)?;
        let mut deployment = deploy::apply_all_but_controller(&cluster).await?;
        controller(&mut deployment)?;
        deploy::create_controller(&cluster, &deployment).await?;
        Ok(Some(Env {
            cluster,
            nodes: sims,
        }))
    }

    pub fn node(&self, name: &str) -> &SimNode {
        &self.nodes[name]
    }

    /// Adds a simulated node with `role` to the running cluster (the shim runs its pods);
    /// [`Env::node`] and [`Env::sysctl`] know it from then on.
    pub async fn add_node(&mut self, name: &str, role: &str) -> Result<()> {
        let node = self
            .cluster
            .add_node(name, &[(super::fixtures::ROLE, role)])
            .await?;
        self.nodes.insert(name.to_string(), node);
        Ok(())
    }

    /// The simulated nodes whose name starts with `prefix`, by name.
    pub fn nodes_named(&self, prefix: &str) -> Vec<&SimNode> {
        self.nodes
            .values()
            .filter(|n| n.name.starts_with(prefix))
            .collect()
    }

    pub fn profiles(&self) -> Api<NodeTuningProfile> {
        Api::all(self.cluster.client())
    }

    pub fn reports(&self) -> Api<NodeTuningReport> {
        Api::all(self.cluster.client())
    }

    /// An `Api` in nodetune's namespace.
    pub fn in_ns<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.cluster.client(), NS)
    }

    /// Server-side applies a profile; returns its new generation.
    pub async fn apply(&self, p: &NodeTuningProfile) -> Result<i64> {
        apply_profile(&self.cluster, p).await
    }

    /// Applies a profile written as YAML; returns its new generation.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<i64> {
        let p: NodeTuningProfile = serde_yaml::from_str(yaml)?;
        self.apply(&p).await
    }

    pub async fn delete_profile(&self, name: &str) -> Result<()> {
        self.profiles()
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    pub async fn wait_profile_gone(&self, name: &str) -> Result<()> {
        self.wait(
            &format!("profile {name} gone (finalizer released)"),
            || async { Ok(self.profiles().get_opt(name).await?.is_none().then_some(())) },
        )
        .await
    }

    /// Polls `check` for [`WAIT`]; a timeout names `what` and carries the cluster's logs.
    pub async fn wait<T, F, Fut>(&self, what: &str, check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        wait_for(what, WAIT, POLL, check)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Waits until the profile satisfies `check`; returns it.
    pub async fn wait_profile<F>(
        &self,
        name: &str,
        what: &str,
        check: F,
    ) -> Result<NodeTuningProfile>
    where
        F: Fn(&NodeTuningProfile) -> bool,
    {
        await_condition(&self.profiles(), name, what, check)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Waits until the node's report has a status satisfying `check`; returns the status.
    pub async fn wait_report<F>(
        &self,
        node: &str,
        what: &str,
        check: F,
    ) -> Result<NodeTuningReportStatus>
    where
        F: Fn(&NodeTuningReportStatus) -> bool,
    {
        let what = format!("report {node}: {what}");
        self.wait(&what, || async {
            let s = self.reports().get_opt(node).await?.and_then(|r| r.status);
            Ok(s.filter(|s| check(s)))
        })
        .await
    }

    /// Adds the cluster's logs to a failure, so CI output explains it.
    pub fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("diagnostics:\n{}", self.cluster.diagnostics()))
    }
}

/// Server-side applies a profile as the tests' field manager; returns its new generation. For
/// scenarios that run a cluster without an [`Env`].
pub async fn apply_profile(cluster: &Cluster, p: &NodeTuningProfile) -> Result<i64> {
    let p = Api::<NodeTuningProfile>::all(cluster.client())
        .patch(
            &p.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(p),
        )
        .await?;
    p.metadata.generation.context("generation")
}

/// Polls `api.get(name)` until `check` holds, for [`WAIT`]; the timeout names `what` and the
/// last object seen (its status, where it has one).
pub async fn await_condition<K, F>(api: &Api<K>, name: &str, what: &str, check: F) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    F: Fn(&K) -> bool,
{
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("object");
    wait_for(&format!("{kind} {name}: {what}"), WAIT, POLL, || async {
        let obj = api.get(name).await?;
        if check(&obj) {
            return Ok(Some(obj));
        }
        bail!("{}", last_seen(&obj))
    })
    .await
}

/// What a timeout prints of the last object: its status (a whole object drowns the message).
fn last_seen<K: Debug>(obj: &K) -> String {
    let text = format!("{obj:?}");
    match text.find("status:") {
        Some(at) => text[at..].to_string(),
        None => text,
    }
}

fn start_shim(cluster: &Cluster, restarts: Restarts) -> Result<()> {
    // option_env!: the benches include this library as examples, where Cargo sets no binary path.
    let agent = option_env!("CARGO_BIN_EXE_nodetune")
        .context("the nodetune binary's path (only integration tests have it)")?;
    if restarts == Restarts::Default {
        return cluster.start_shim(agent);
    }
    let mut cfg = ShimConfig::new(
        agent.into(),
        cluster.node_server().to_string(),
        cluster.ca_file(),
        cluster.dir().join("pods"),
    );
    cfg.backoff_base = Duration::from_millis(250);
    cfg.backoff_cap = Duration::from_secs(1);
    cluster.start_shim_with(cfg)
}

/// Sysctls read and written inside a simulated node's namespace.
impl Env {
    /// One key's value (whitespace normalised, as `ip_local_port_range` prints tabs).
    pub async fn sysctl(&self, node: &str, key: &str) -> Result<String> {
        let out = self.node(node).exec_ok(&["sysctl", "-n", key]).await?;
        Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// Values of `keys` (whitespace normalised), in one `sysctl` call.
    pub async fn sysctls<S: AsRef<str>>(
        &self,
        node: &str,
        keys: &[S],
    ) -> Result<BTreeMap<String, String>> {
        let mut cmd = vec!["sysctl".to_string()];
        cmd.extend(keys.iter().map(|k| k.as_ref().to_string()));
        let out = self.node(node).exec_ok(&cmd).await?;
        let mut values = BTreeMap::new();
        for line in out.lines() {
            let (k, v) = line
                .split_once(" = ")
                .with_context(|| format!("sysctl output line {line:?}"))?;
            values.insert(
                k.trim().to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            );
        }
        ensure!(values.len() == keys.len(), "sysctl printed {values:?}");
        Ok(values)
    }

    pub async fn set_sysctl(&self, node: &str, key: &str, value: &str) -> Result<()> {
        self.node(node)
            .exec_ok(&["sysctl", "-qw", &format!("{key}={value}")])
            .await?;
        Ok(())
    }

    /// Waits until `key` reads `want` in the node's namespace.
    pub async fn wait_sysctl(&self, node: &str, key: &str, want: &str) -> Result<()> {
        self.wait(&format!("{key}={want} on {node}"), || async {
            Ok((self.sysctl(node, key).await? == want).then_some(()))
        })
        .await
    }

    /// Waits until the node's namespace holds every value of `want`.
    pub async fn wait_sysctls(&self, node: &str, want: &BTreeMap<String, String>) -> Result<()> {
        self.wait_sysctls_for(node, want, WAIT).await
    }

    pub async fn wait_sysctls_for(
        &self,
        node: &str,
        want: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<()> {
        let keys: Vec<&String> = want.keys().collect();
        wait_for(
            &format!("{node} to hold {want:?}"),
            timeout,
            POLL,
            || async {
                let have = self.sysctls(node, &keys).await?;
                if have == *want {
                    return Ok(Some(()));
                }
                bail!("holds {have:?}")
            },
        )
        .await
        .map_err(|e| self.fail(e))
    }
}

/// The agent pods and Events.
impl Env {
    /// Agent pods not being deleted.
    pub async fn agent_pods(&self) -> Result<Vec<Pod>> {
        let pods = self
            .in_ns::<Pod>()
            .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
            .await?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// The agent pod on `node`.
    pub async fn agent_on(&self, node: &str) -> Result<Pod> {
        self.agent_pods()
            .await?
            .into_iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .with_context(|| format!("agent on {node}"))
    }

    /// Node name → pod UID of the running agents.
    pub async fn agent_uids(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .agent_pods()
            .await?
            .into_iter()
            .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.uid()?)))
            .collect())
    }

    /// Waits until agents run on exactly `want`; returns node → pod UID.
    pub async fn wait_agents_on(&self, want: &[&str]) -> Result<BTreeMap<String, String>> {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        self.wait(&format!("agent pods exactly on {want:?}"), || async {
            let uids = self.agent_uids().await?;
            Ok((uids.keys().cloned().collect::<Vec<_>>() == want).then_some(uids))
        })
        .await
    }

    /// Reasons of the Events about an object, space-separated.
    pub async fn event_reasons(&self, name: &str) -> Result<String> {
        self.events_as(name, "jsonpath={.items[*].reason}").await
    }

    /// `type reason` of the Events about an object, one per line.
    pub async fn event_lines(&self, name: &str) -> Result<String> {
        self.events_as(
            name,
            "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
        )
        .await
    }

    /// Waits for an Event line `type reason` about an object.
    pub async fn wait_event(&self, name: &str, want: &str) -> Result<()> {
        self.wait(&format!("event {want:?} on {name}"), || async {
            Ok(self
                .event_lines(name)
                .await?
                .lines()
                .any(|l| l == want)
                .then_some(()))
        })
        .await
    }

    async fn events_as(&self, name: &str, output: &str) -> Result<String> {
        let selector = format!("involvedObject.name={name}");
        let args = [
            "get",
            "events",
            "-A",
            "--field-selector",
            &selector,
            "-o",
            output,
        ];
        kubectl(&self.cluster, &args).await
    }
}
