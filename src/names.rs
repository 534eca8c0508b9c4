//! The names nodetune's objects, labels and writers go by, in one place: the controller, the
//! agent's DaemonSet rendering and `nodetune uninstall` all read them from here, so a rename
//! cannot leave one of them looking for the old name.

/// The profile finalizer: a profile stays until every node's agent has restored its keys.
pub const FINALIZER: &str = "nodetune.dev/cleanup";
/// The node label the controller sets on nodes that need an agent; the DaemonSet selects it.
pub const AGENT_NODE_LABEL: &str = "nodetune.dev/agent";
/// Name of the agent DaemonSet (and of its container's app label value).
pub const DAEMONSET_NAME: &str = "nodetune-agent";
/// The `app.kubernetes.io/name` of every object nodetune makes.
pub const APP_NAME: &str = "nodetune";
/// The `app.kubernetes.io/component` of the agent's DaemonSet and pods.
pub const AGENT_COMPONENT: &str = "agent";
/// Label selector of the agent pods.
pub const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/component=agent";
/// Field manager of every write the controller makes.
pub const CONTROLLER_FIELD_MANAGER: &str = "nodetune-controller";
/// Field manager of `nodetune uninstall`'s writes.
pub const UNINSTALL_FIELD_MANAGER: &str = "nodetune-uninstall";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_selector_is_the_component_label() {
        assert_eq!(
            AGENT_POD_SELECTOR,
            format!("app.kubernetes.io/component={AGENT_COMPONENT}")
        );
    }
}
