//! The API writes the controller's executor and `nodetune uninstall` both make, built once:
//! patch parameters under a field manager, the resourceVersion-pinned finalizer patch, the
//! agent-label removal, and "already gone" as success.
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::NodeTuningProfile;
use crate::names::{AGENT_NODE_LABEL, FINALIZER};

/// Params of a non-apply patch, attributed to `field_manager`.
pub fn manager(field_manager: &str) -> PatchParams {
    PatchParams {
        field_manager: Some(field_manager.into()),
        ..Default::default()
    }
}

/// The object is already gone: for a delete or an unlabel that is success.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// The finalizer list without nodetune's own.
pub fn without_ours(finalizers: &[String]) -> Vec<String> {
    finalizers
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect()
}

/// A finalizer list to write to one profile, pinned to the resourceVersion it was computed
/// from (optimistic concurrency: a concurrent change fails it with 409, and the next attempt
/// works on fresh data instead of dropping a finalizer someone just added).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalizerPatch {
    pub profile: String,
    pub resource_version: Option<String>,
    pub finalizers: Vec<String>,
}

impl FinalizerPatch {
    pub fn new(p: &NodeTuningProfile, finalizers: Vec<String>) -> Self {
        Self {
            profile: p.name_any(),
            resource_version: p.metadata.resource_version.clone(),
            finalizers,
        }
    }

    /// The patch that drops nodetune's finalizer from `p` and keeps everyone else's.
    pub fn release(p: &NodeTuningProfile) -> Self {
        Self::new(p, without_ours(p.finalizers()))
    }

    /// The JSON merge patch body.
    pub fn body(&self) -> serde_json::Value {
        json!({"metadata": {
            "resourceVersion": self.resource_version,
            "finalizers": self.finalizers,
        }})
    }

    pub async fn send(
        &self,
        profiles: &Api<NodeTuningProfile>,
        field_manager: &str,
    ) -> Result<(), kube::Error> {
        profiles
            .patch(
                &self.profile,
                &manager(field_manager),
                &Patch::Merge(self.body()),
            )
            .await
            .map(|_| ())
    }
}

/// Removes the agent label from `node`, whoever set it (a merge patch with null; a
/// server-side apply without the label would only drop it while this manager is its sole
/// owner).
pub async fn unlabel_node(
    nodes: &Api<Node>,
    node: &str,
    field_manager: &str,
) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"labels": {AGENT_NODE_LABEL: null}}});
    nodes
        .patch(node, &manager(field_manager), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_only_our_finalizer() {
        let list = vec!["other/x".to_string(), FINALIZER.to_string()];
        assert_eq!(without_ours(&list), vec!["other/x".to_string()]);
        assert!(without_ours(&[FINALIZER.to_string()]).is_empty());
    }

    #[test]
    fn the_finalizer_patch_pins_the_resource_version() {
        let mut p = NodeTuningProfile::test("web").with_finalizers(&[FINALIZER, "other/x"]);
        p.metadata.resource_version = Some("42".into());
        let body = FinalizerPatch::release(&p).body();
        assert_eq!(
            body,
            json!({"metadata": {"resourceVersion": "42", "finalizers": ["other/x"]}})
        );
    }
}
