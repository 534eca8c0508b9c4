//! The startup taint on nodes no profile selects: no agent runs there to remove it (see
//! [`crate::agent::taint`]), so the controller does, or the node would never take work. Each
//! node is looked at once per term (a node registers with the taint; nothing adds it later),
//! at most [`PER_PASS`] per pass so a first pass over a large cluster does not flood the API.
use std::collections::BTreeSet;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use super::render::AGENT_NODE_LABEL;
use crate::agent::taint::{self, Removed};
use crate::api::NodeTuningProfile;
use crate::plan::NodeLabels;
use crate::selector::LabelLookup;

/// Nodes read per pass, at most.
pub const PER_PASS: usize = 64;

/// The nodes to look at: not selected by any profile (an unevaluable selector counts as
/// selecting, so its nodes keep waiting for a fixed profile), without the agent label (an agent
/// still restoring there removes the taint itself), and not looked at yet. Pure.
pub fn candidates<'n>(
    profiles: &[&NodeTuningProfile],
    nodes: &'n NodeLabels<'_>,
    checked: &BTreeSet<String>,
) -> Vec<&'n str> {
    nodes
        .iter()
        .filter(|(name, _)| !checked.contains(name.as_ref()))
        .filter(|(_, labels)| labels.label(AGENT_NODE_LABEL).is_none())
        .filter(|(_, labels)| {
            !profiles
                .iter()
                .any(|p| crate::plan::selects(p, &***labels).unwrap_or(true))
        })
        .map(|(name, _)| name.as_ref())
        .take(PER_PASS)
        .collect()
}

/// The controller's memory of the nodes it looked at.
pub struct Untainter {
    nodes: Api<Node>,
    checked: Mutex<BTreeSet<String>>,
}

impl Untainter {
    pub fn new(nodes: Api<Node>) -> Self {
        Self {
            nodes,
            checked: Mutex::new(BTreeSet::new()),
        }
    }

    /// Removes the taint from the [`candidates`]; a failure is retried next pass.
    pub async fn sweep(&self, profiles: &[&NodeTuningProfile], nodes: &NodeLabels<'_>) {
        let todo: Vec<String> = {
            let Ok(checked) = self.checked.lock() else {
                return;
            };
            candidates(profiles, nodes, &checked)
                .into_iter()
                .map(str::to_owned)
                .collect()
        };
        for name in todo {
            match taint::remove(&self.nodes, &name).await {
                Ok(r) => {
                    if r == Removed::Removed {
                        tracing::info!(node = %name, taint = taint::TAINT_KEY, "startup taint removed: no profile selects the node");
                    }
                    if let Ok(mut c) = self.checked.lock() {
                        c.insert(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "removing the startup taint failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeTuningProfileSpec;

    #[test]
    fn only_nodes_no_profile_selects_and_without_an_agent_are_candidates() {
        let web = NodeTuningProfile::new(
            "web",
            NodeTuningProfileSpec {
                node_selector: crate::selector::from_pairs(&["role=web".into()]).expect("pair"),
                ..Default::default()
            },
        );
        let nodes = crate::plan::owned_node_labels([
            ("web-1".into(), [("role".into(), "web".into())].into()),
            ("db-1".into(), [("role".into(), "db".into())].into()),
            (
                "draining".into(),
                [(AGENT_NODE_LABEL.into(), "true".into())].into(),
            ),
            ("seen".into(), Default::default()),
        ]);
        let checked = ["seen".to_string()].into();
        assert_eq!(candidates(&[&web], &nodes, &checked), ["db-1"]);
    }
}
