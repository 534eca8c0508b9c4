//! How one matched node stands for one profile, read from its report, and the bounded summary
//! line the profile's status shows for it.
use crate::api::{KeyState, Mode, NodeSummary, NodeTuningReport};
use crate::text::bounded_list;

/// Longest per-node summary message.
pub const MAX_NODE_MESSAGE: usize = 256;

/// One failing key on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedKey {
    pub key: String,
    pub state: KeyState,
    pub message: Option<String>,
}

/// How one matched node stands for one profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeStanding {
    /// Some of this profile's winning keys failed.
    Failed(Vec<FailedKey>),
    /// No report, or a report for another generation.
    Pending(String),
    /// Current generation applied (or evaluated in DryRun) without failure.
    Applied { dry_run: bool, overridden: usize },
}

impl NodeStanding {
    /// Sort rank: unhealthy nodes first in the status's bounded node list.
    pub fn rank(&self) -> u8 {
        match self {
            Self::Failed(_) => 0,
            Self::Pending(_) => 1,
            Self::Applied { .. } => 2,
        }
    }
}

/// The standing of a node for profile `name` at `generation`, and the generation its agent
/// last acted on.
pub fn standing(
    name: &str,
    generation: i64,
    report: Option<&NodeTuningReport>,
) -> (NodeStanding, Option<i64>) {
    let Some(status) = report.and_then(|r| r.status.as_ref()) else {
        return (
            NodeStanding::Pending("no report from the node's agent yet".into()),
            None,
        );
    };
    let Some(applied) = status.profiles.iter().find(|p| p.name == name) else {
        return (
            NodeStanding::Pending("the node's agent has not picked up this profile yet".into()),
            None,
        );
    };
    if applied.generation != generation {
        return (
            NodeStanding::Pending(format!(
                "the node's agent acted on generation {}, not {generation}",
                applied.generation
            )),
            Some(applied.generation),
        );
    }
    let failed: Vec<FailedKey> = status
        .sysctls
        .iter()
        .filter(|e| e.profile.as_deref() == Some(name) && e.is_failure())
        .map(|e| FailedKey {
            key: e.key.clone(),
            state: e.state,
            message: e.message.clone(),
        })
        .collect();
    let st = if failed.is_empty() {
        NodeStanding::Applied {
            dry_run: applied.mode == Mode::DryRun,
            overridden: applied.overridden_keys.len(),
        }
    } else {
        NodeStanding::Failed(failed)
    };
    (st, Some(applied.generation))
}

/// The winner of each of this profile's overridden keys on one node: (key, winner).
pub fn overrides(name: &str, report: Option<&NodeTuningReport>) -> Vec<(String, String)> {
    let Some(status) = report.and_then(|r| r.status.as_ref()) else {
        return vec![];
    };
    let Some(applied) = status.profiles.iter().find(|p| p.name == name) else {
        return vec![];
    };
    applied
        .overridden_keys
        .iter()
        .map(|k| {
            let winner = status
                .sysctls
                .iter()
                .find(|e| &e.key == k)
                .and_then(|e| e.profile.clone())
                .unwrap_or_else(|| "another profile".into());
            (k.clone(), winner)
        })
        .collect()
}

/// The failing keys as one bounded line. Keys come first: when the kernel's messages do not
/// all fit, they are dropped so that every key (or as many as fit) is still named.
fn failed_message(keys: &[FailedKey]) -> String {
    let full: Vec<String> = keys
        .iter()
        .map(|k| match &k.message {
            Some(m) => format!("{}: {:?} ({m})", k.key, k.state),
            None => format!("{}: {:?}", k.key, k.state),
        })
        .collect();
    let joined = full.join("; ");
    if joined.len() <= MAX_NODE_MESSAGE {
        return joined;
    }
    let short: Vec<String> = keys
        .iter()
        .map(|k| format!("{}: {:?}", k.key, k.state))
        .collect();
    bounded_list(&short, MAX_NODE_MESSAGE)
}

/// The node's line in the profile's status.
pub fn summary(node: &str, st: NodeStanding, seen_generation: Option<i64>) -> NodeSummary {
    let (state, message) = match st {
        NodeStanding::Failed(keys) => ("Failed", Some(failed_message(&keys))),
        NodeStanding::Pending(why) => ("Pending", Some(why)),
        NodeStanding::Applied { overridden, .. } if overridden > 0 => (
            "Overridden",
            Some(format!(
                "{overridden} key(s) set by a higher-priority profile"
            )),
        ),
        NodeStanding::Applied { dry_run: true, .. } => ("DryRun", None),
        NodeStanding::Applied { .. } => ("Applied", None),
    };
    NodeSummary {
        name: node.into(),
        state: state.into(),
        applied_generation: seen_generation,
        message: message.map(|m| crate::text::truncate(m, MAX_NODE_MESSAGE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(key: &str, message: Option<&str>) -> FailedKey {
        FailedKey {
            key: key.into(),
            state: KeyState::Invalid,
            message: message.map(Into::into),
        }
    }

    #[test]
    fn node_message_names_the_failing_keys_before_the_kernel_messages() {
        let long = "the kernel refused the value because ".repeat(10);
        let keys = vec![
            failed("net.ipv4.tcp_congestion_control", Some(&long)),
            failed("net.ipv4.tcp_rmem", Some(&long)),
        ];
        let s = summary("n1", NodeStanding::Failed(keys), Some(1));
        let msg = s.message.expect("message");
        assert!(msg.len() <= MAX_NODE_MESSAGE, "{msg}");
        assert!(
            msg.contains("net.ipv4.tcp_congestion_control: Invalid"),
            "{msg}"
        );
        assert!(msg.contains("net.ipv4.tcp_rmem: Invalid"), "{msg}");
        assert!(!msg.contains("more"), "{msg}");
    }

    #[test]
    fn short_messages_are_kept_whole() {
        let keys = vec![failed("net.ipv4.tcp_rmem", Some("EINVAL"))];
        let s = summary("n1", NodeStanding::Failed(keys), Some(1));
        assert_eq!(
            s.message.as_deref(),
            Some("net.ipv4.tcp_rmem: Invalid (EINVAL)")
        );
        assert_eq!(s.state, "Failed");
    }
}
