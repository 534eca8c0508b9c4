//! The facts about one pod that planning needs, taken from a `Pod` object (untrusted input:
//! anything missing is an error naming the field, never a panic).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// Names one pod: `namespace/name`, and its uid (names are reused, uids are not).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod on the node, as planning sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// The labels of the pod's namespace (for `spec.namespaceSelector`).
    pub namespace_labels: BTreeMap<String, String>,
    /// `spec.hostNetwork`: the pod shares the host's namespace, which only host profiles tune.
    pub host_network: bool,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`), if set.
    pub phase: Option<String>,
    /// `spec.securityContext.sysctls`, name to value, as the pod wrote them.
    pub sysctls: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodInfoError {
    #[error("pod without {0}: cannot be tuned")]
    Missing(&'static str),
}

impl PodInfo {
    /// The planning facts of `pod`, whose namespace carries `namespace_labels`.
    pub fn from_pod(
        pod: &Pod,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Result<Self, PodInfoError> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let sysctls = spec
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| c.sysctls.as_ref())
            .map(|list| {
                list.iter()
                    .map(|s| (s.name.clone(), s.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            namespace: meta
                .namespace
                .clone()
                .ok_or(PodInfoError::Missing("metadata.namespace"))?,
            name: meta
                .name
                .clone()
                .ok_or(PodInfoError::Missing("metadata.name"))?,
            uid: meta
                .uid
                .clone()
                .ok_or(PodInfoError::Missing("metadata.uid"))?,
            labels: meta.labels.clone().unwrap_or_default(),
            namespace_labels: namespace_labels.clone(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
            sysctls,
        })
    }

    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    /// Whether the pod has (or is about to have) a network namespace of its own worth tuning:
    /// not hostNetwork, and not finished. `Pending` counts: its sandbox may already exist
    /// (init containers run in it), and the agent tunes only namespaces it finds.
    pub fn is_tunable(&self) -> bool {
        !self.host_network && matches!(self.phase.as_deref(), Some("Pending" | "Running"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, PodStatus, Sysctl};

    #[test]
    fn from_pod_reads_the_fields_and_refuses_a_pod_without_uid() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("web".into());
        pod.metadata.name = Some("squid-0".into());
        pod.metadata.labels = Some([("app".to_string(), "squid".to_string())].into());
        pod.spec = Some(PodSpec {
            host_network: Some(false),
            security_context: Some(PodSecurityContext {
                sysctls: Some(vec![Sysctl {
                    name: "net.ipv4.tcp_fin_timeout".into(),
                    value: "15".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        assert_eq!(
            PodInfo::from_pod(&pod, &BTreeMap::new()),
            Err(PodInfoError::Missing("metadata.uid"))
        );
        pod.metadata.uid = Some("u1".into());
        let ns: BTreeMap<String, String> = [("team".to_string(), "edge".to_string())].into();
        let info = PodInfo::from_pod(&pod, &ns).expect("complete pod");
        assert_eq!(info.pod_ref().to_string(), "web/squid-0");
        assert_eq!(info.sysctls["net.ipv4.tcp_fin_timeout"], "15");
        assert_eq!(info.namespace_labels, ns);
        assert!(info.is_tunable());
    }

    #[test]
    fn host_network_and_finished_pods_are_not_tunable() {
        let base = PodInfo {
            phase: Some("Running".into()),
            ..Default::default()
        };
        assert!(base.is_tunable());
        for p in [
            PodInfo {
                host_network: true,
                ..base.clone()
            },
            PodInfo {
                phase: Some("Succeeded".into()),
                ..base.clone()
            },
            PodInfo {
                phase: Some("Failed".into()),
                ..base.clone()
            },
            PodInfo {
                phase: None,
                ..base.clone()
            },
        ] {
            assert!(!p.is_tunable(), "{p:?}");
        }
    }
}
