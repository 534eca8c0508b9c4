//! The startup taint `nodetune.dev/untuned:NoSchedule` (opt-in: a node pool registers its nodes
//! with it, kubelet `--register-with-taints`): workloads do not start on a node before its keys
//! are applied. The agent (its DaemonSet tolerates the taint) removes it from its own Node once
//! a pass applied and verified every key, or found that the keys left can never apply
//! (Unsupported, Denied, Invalid: waiting would strand the node), with the reason in the
//! report's `startupTaint`. A key that `Failed` (an I/O error, a read-back mismatch) may succeed
//! next pass: the taint stays until then. The controller removes it from nodes no profile
//! selects, where no agent runs.
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::api::{KeyState, NodeTuningReportStatus};

/// The taint's key.
pub const TAINT_KEY: &str = "nodetune.dev/untuned";
/// The field manager of the agent's Node patch.
const MANAGER: &str = "nodetune-agent-taint";

/// Whether the pass described by `status` lets the taint go, and why. `None`: keep it (a key
/// may still apply). An unusable ledger or policy refuses every key (Denied): the taint goes,
/// and the report says why the keys are not applied.
pub fn verdict(status: &NodeTuningReportStatus) -> Option<String> {
    if status.sysctls.iter().any(|e| e.state == KeyState::Failed) {
        return None;
    }
    let never: Vec<String> = status
        .sysctls
        .iter()
        .filter(|e| e.state.is_failure())
        .map(|e| format!("{} ({:?})", e.key, e.state))
        .collect();
    let applied = status
        .sysctls
        .iter()
        .filter(|e| e.state == KeyState::Applied)
        .count();
    Some(if never.is_empty() {
        format!("removed after the first verified pass ({applied} keys applied)")
    } else {
        format!(
            "removed although some keys can never apply here (the node is not held back for them): {}",
            crate::text::bounded_list(&never, crate::conditions::MAX_MESSAGE)
        )
    })
}

/// `taints` without ours; `None` when ours is not there.
pub fn without_ours(taints: &[Taint]) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints
        .iter()
        .filter(|t| t.key != TAINT_KEY)
        .cloned()
        .collect();
    (kept.len() != taints.len()).then_some(kept)
}

/// Whether the taint was on the node.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    Absent,
    Removed,
}

/// Removes the taint from `node_name`: a merge patch of `spec.taints` pinned to the
/// resourceVersion read, so a taint another writer adds meanwhile is never lost (a conflict is
/// an error: the next pass tries again).
pub async fn remove(nodes: &Api<Node>, node_name: &str) -> Result<Removed, kube::Error> {
    let node = nodes.get(node_name).await?;
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let Some(kept) = without_ours(taints) else {
        return Ok(Removed::Absent);
    };
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": node.metadata.resource_version },
        "spec": { "taints": if kept.is_empty() { serde_json::Value::Null } else { serde_json::json!(kept) } },
    });
    nodes
        .patch(
            node_name,
            &PatchParams::apply(MANAGER),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Removed::Removed)
}

/// The agent's memory of the taint: checked until it is gone once, then never again (a node
/// registers with it; nothing adds it later).
#[derive(Default)]
pub struct StartupTaint {
    /// Why the taint is gone (or was never there), once known; shown in every later report.
    done: Option<String>,
}

impl StartupTaint {
    /// After a pass: removes the taint when the pass allows it, and records why in `status`.
    pub async fn after_pass(
        &mut self,
        nodes: &Api<Node>,
        node_name: &str,
        status: &mut NodeTuningReportStatus,
    ) {
        if self.done.is_none()
            && let Some(why) = verdict(status)
        {
            match remove(nodes, node_name).await {
                Ok(Removed::Removed) => {
                    tracing::info!(taint = TAINT_KEY, reason = %why, "startup taint removed");
                    self.done = Some(why);
                }
                Ok(Removed::Absent) => self.done = Some(String::new()),
                Err(e) => {
                    tracing::warn!(error = %e, taint = TAINT_KEY, "removing the startup taint failed; next pass tries again");
                    status
                        .warnings
                        .push(format!("startup taint {TAINT_KEY} not removed yet: {e}"));
                }
            }
        }
        status.startup_taint = self.done.clone().filter(|s| !s.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SysctlEntry;

    fn entry(key: &str, state: KeyState) -> SysctlEntry {
        SysctlEntry {
            key: key.into(),
            desired: Some("1".into()),
            actual: None,
            original: None,
            profile: None,
            scope: crate::api::Scope::NetworkNamespace,
            optional: false,
            state,
            message: None,
        }
    }

    fn status(states: &[KeyState]) -> NodeTuningReportStatus {
        NodeTuningReportStatus {
            sysctls: states
                .iter()
                .enumerate()
                .map(|(i, s)| entry(&format!("net.ipv4.k{i}"), *s))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_taint_goes_after_a_verified_pass_or_when_keys_can_never_apply() {
        let ok = verdict(&status(&[KeyState::Applied, KeyState::Applied])).expect("removed");
        assert!(ok.contains("2 keys applied"), "{ok}");
        let never =
            verdict(&status(&[KeyState::Applied, KeyState::Unsupported])).expect("never stranded");
        assert!(never.contains("net.ipv4.k1 (Unsupported)"), "{never}");
        assert!(verdict(&status(&[KeyState::Denied])).is_some());
        assert_eq!(
            verdict(&status(&[KeyState::Applied, KeyState::Failed])),
            None,
            "a failed write may succeed next pass"
        );
    }

    #[test]
    fn only_our_taint_is_taken_off() {
        let t = |key: &str| Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let kept = without_ours(&[t("a"), t(TAINT_KEY), t("b")]).expect("ours was there");
        assert_eq!(
            kept.iter().map(|t| t.key.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(without_ours(&[t("a")]), None);
    }
}
