//! How one matched node stands for one profile, read from its report, and the bounded summary
//! line the profile's status shows for it.
use std::sync::Arc;

use crate::api::{KeyState, NodeSummary};
use crate::controller::cache::ReportDigest;
use crate::text::bounded_list;

/// Longest per-node summary message.
pub const MAX_NODE_MESSAGE: usize = 256;

/// One failing key on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedKey {
    pub key: Arc<str>,
    pub state: KeyState,
    pub message: Option<Box<str>>,
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
    report: Option<&ReportDigest>,
) -> (NodeStanding, Option<i64>) {
    let Some(report) = report else {
        return (
            NodeStanding::Pending("no report from the node's agent yet".into()),
            None,
        );
    };
    let Some(applied) = report.profile(name) else {
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
    let st = if applied.failed.is_empty() {
        NodeStanding::Applied {
            dry_run: applied.dry_run,
            overridden: applied.overridden.len(),
        }
    } else {
        NodeStanding::Failed(applied.failed.to_vec())
    };
    (st, Some(applied.generation))
}

/// The winner of each of this profile's overridden keys on one node: (key, winner).
pub fn overrides<'r>(
    name: &str,
    report: Option<&'r ReportDigest>,
) -> impl Iterator<Item = (&'r Arc<str>, &'r str)> + 'r {
    report
        .and_then(|r| r.profile(name))
        .into_iter()
        .flat_map(|p| p.overridden.iter())
        .map(|(key, winner)| (key, winner.as_deref().unwrap_or("another profile")))
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
            failed("net.ipv4.tcp_congestion_control", Some(long.as_str())),
            failed("net.ipv4.tcp_rmem", Some(long.as_str())),
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
