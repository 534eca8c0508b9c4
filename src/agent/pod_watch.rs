//! The agent's views of its node's pods: names for pod counting, and, when pod targeting is
//! on, the facts pod planning needs (labels, phase, `hostNetwork`, `securityContext.sysctls`)
//! and the labels of their namespaces. One watch of the node's pods either way (field selector
//! `spec.nodeName`), trimmed to what is used before it is cached.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodSecurityContext, PodSpec, PodStatus};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::pods::PodNames;
use crate::podtune::PodInfo;

/// What the agent watches of its pods.
pub enum PodViews {
    /// Pod counting only: names.
    Names(Store<PartialObjectMeta<Pod>>),
    /// Pod targeting: the pods as planning needs them, and their namespaces' labels.
    Full {
        pods: Store<Pod>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        /// Both lists complete: until then no pod is planned, so nothing is restored from a
        /// partial view. Set by a task, so the host's tuning never waits for it (a watch the
        /// agent's RBAC refuses retries forever, and must not stall the host).
        ready: Arc<AtomicBool>,
    },
}

/// Keeps of a pod what planning and naming read: a node's pods' full specs would cost the
/// agent megabytes for nothing.
fn trim(p: &mut Pod) {
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    p.spec = p.spec.take().map(|s| PodSpec {
        host_network: s.host_network,
        security_context: s.security_context.map(|c| PodSecurityContext {
            sysctls: c.sysctls,
            ..Default::default()
        }),
        node_name: s.node_name,
        ..Default::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..Default::default()
    });
}

impl PodViews {
    /// Starts the watches. `changed` is notified on every pod or namespace event when pod
    /// targeting is on (a new pod must get its values within seconds, not at the interval);
    /// with counting only, pod churn wakes nobody.
    pub fn start(
        client: &Client,
        node: &str,
        targeting: bool,
        changed: Arc<Notify>,
        on_error: impl Fn() + Clone + Send + Sync + 'static,
    ) -> Self {
        let config = crate::watch::config().fields(&format!("spec.nodeName={node}"));
        if !targeting {
            return Self::Names(crate::watch::reflect_trimmed(
                watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), config)
                    .default_backoff(),
                Arc::new(Notify::new()),
                "pods",
                on_error,
                |p: &mut PartialObjectMeta<Pod>| {
                    p.metadata.labels = None;
                    p.metadata.annotations = None;
                    p.metadata.owner_references = None;
                },
            ));
        }
        let pods = crate::watch::reflect_trimmed(
            watcher(Api::<Pod>::all(client.clone()), config).default_backoff(),
            changed.clone(),
            "pods",
            on_error.clone(),
            trim,
        );
        let namespaces = crate::watch::reflect_trimmed(
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                crate::watch::config(),
            )
            .default_backoff(),
            changed.clone(),
            "namespaces",
            on_error,
            |n: &mut PartialObjectMeta<Namespace>| {
                n.metadata.annotations = None;
                n.metadata.owner_references = None;
            },
        );
        let ready = Arc::new(AtomicBool::new(false));
        let (p, n, r) = (pods.clone(), namespaces.clone(), ready.clone());
        tokio::spawn(async move {
            if p.wait_until_ready().await.is_ok() && n.wait_until_ready().await.is_ok() {
                r.store(true, Ordering::Release);
                tracing::info!("pods and namespaces synced: pod targeting starts");
                changed.notify_one();
            }
        });
        Self::Full {
            pods,
            namespaces,
            ready,
        }
    }

    /// UID to (namespace, name) of every pod held.
    pub fn names(&self) -> PodNames {
        let named = |m: &kube::api::ObjectMeta| {
            Some((
                m.uid.clone()?,
                (m.namespace.clone().unwrap_or_default(), m.name.clone()?),
            ))
        };
        match self {
            Self::Names(s) => s
                .state()
                .iter()
                .filter_map(|p| named(&p.metadata))
                .collect(),
            Self::Full { pods, .. } => pods
                .state()
                .iter()
                .filter_map(|p| named(&p.metadata))
                .collect(),
        }
    }

    /// Planning facts of every pod held, and the uids of all of them; `None` before both
    /// lists are complete (planning from a partial view could restore keys a profile still
    /// wants in a pod not listed yet). A pod missing a required field is left out (it cannot
    /// be planned), but its uid still counts as known.
    pub fn infos(&self) -> Option<(Vec<PodInfo>, BTreeSet<String>)> {
        let Self::Full {
            pods,
            namespaces,
            ready,
        } = self
        else {
            return None;
        };
        if !ready.load(Ordering::Acquire) {
            return None;
        }
        let ns_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
            .state()
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let none = BTreeMap::new();
        let all = pods.state();
        let known = all.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let infos = all
            .iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.as_deref().unwrap_or_default();
                PodInfo::from_pod(p, ns_labels.get(ns).unwrap_or(&none)).ok()
            })
            .collect();
        Some((infos, known))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, Sysctl};

    /// Nothing is planned (so nothing restored) before both lists are complete; the host pass
    /// never waits for them (`Watches::ready` does not).
    #[test]
    fn no_pod_is_planned_from_incomplete_lists() {
        let (pods, _w) = kube::runtime::reflector::store::<Pod>();
        let (namespaces, _n) = kube::runtime::reflector::store::<PartialObjectMeta<Namespace>>();
        let ready = Arc::new(AtomicBool::new(false));
        let views = PodViews::Full {
            pods,
            namespaces,
            ready: ready.clone(),
        };
        assert!(views.infos().is_none());
        ready.store(true, Ordering::Release);
        let (infos, known) = views.infos().expect("complete");
        assert!(infos.is_empty() && known.is_empty());
    }

    #[test]
    fn trimming_keeps_what_planning_reads_and_drops_the_containers() {
        let mut pod = Pod::default();
        pod.metadata.uid = Some("u".into());
        pod.metadata.labels = Some([("app".to_string(), "squid".to_string())].into());
        pod.metadata.annotations = Some([("big".to_string(), "x".repeat(1000))].into());
        pod.spec = Some(PodSpec {
            containers: vec![Container {
                name: "squid".into(),
                ..Default::default()
            }],
            host_network: Some(true),
            security_context: Some(PodSecurityContext {
                sysctls: Some(vec![Sysctl {
                    name: "net.ipv4.tcp_fin_timeout".into(),
                    value: "15".into(),
                }]),
                run_as_user: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        });
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            ..Default::default()
        });
        trim(&mut pod);
        let spec = pod.spec.as_ref().expect("spec");
        assert!(spec.containers.is_empty());
        assert_eq!(spec.host_network, Some(true));
        let ctx = spec.security_context.as_ref().expect("ctx");
        assert_eq!(
            (ctx.sysctls.as_ref().map(Vec::len), ctx.run_as_user),
            (Some(1), None)
        );
        let status = pod.status.as_ref().expect("status");
        assert_eq!(
            (status.phase.as_deref(), status.pod_ip.as_deref()),
            (Some("Running"), None)
        );
        assert!(pod.metadata.annotations.is_none() && pod.metadata.labels.is_some());
    }
}
