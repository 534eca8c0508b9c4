//! The Node's own Ready condition for the few nodes soaking a revision. The controller caches
//! Nodes metadata-only (their status is most of their size and changes every heartbeat), so a
//! pass reads the Node of each soaking node with a GET: at most `maxNodesInFlight` per profile.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::api::NodeTuningProfile;

/// Node name to why it is not Ready (nodes that are Ready, or could not be read, are absent).
pub type NotReady = BTreeMap<String, String>;

/// Why `node` is not Ready, or `None` when its Ready condition is True. A Node without a Ready
/// condition counts as Unknown, as the node lifecycle controller counts it.
pub fn not_ready(node: &Node) -> Option<String> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let Some(c) = ready else {
        return Some("the Node has no Ready condition (Unknown)".into());
    };
    if c.status == "True" {
        return None;
    }
    let reason = c.reason.as_deref().unwrap_or("no reason given");
    let message = c.message.as_deref().unwrap_or_default();
    Some(
        format!(
            "the Node's Ready condition is {} ({reason}) {message}",
            c.status
        )
        .trim_end()
        .to_string(),
    )
}

/// The nodes soaking a revision of any rolled-out profile, by the statuses the pass starts
/// from (`newer` holds statuses this term wrote that the cache may not show yet).
pub fn soaking<'a>(
    profiles: &[&'a NodeTuningProfile],
    newer: impl Fn(&str) -> Option<&'a crate::api::NodeTuningProfileStatus>,
) -> BTreeSet<&'a str> {
    profiles
        .iter()
        .filter(|p| p.spec.rollout.is_some())
        .filter_map(|p| {
            let name = p.metadata.name.as_deref().unwrap_or_default();
            newer(name).or(p.status.as_ref())?.rollout.as_ref()
        })
        .flat_map(|r| r.soaking.iter().map(|s| s.name.as_str()))
        .collect()
}

/// Reads the Nodes of `names`; those not Ready with why. A Node that cannot be read is left
/// out (judged on its report alone): the controller's trouble reaching the API server says
/// nothing of the node, and must not roll a revision back.
pub async fn read(api: &Api<Node>, names: &BTreeSet<&str>) -> NotReady {
    let reads = names.iter().map(|n| async move { (*n, api.get(n).await) });
    let mut out = NotReady::new();
    for (name, got) in futures::future::join_all(reads).await {
        match got {
            Ok(node) => {
                if let Some(why) = not_ready(&node) {
                    out.insert(name.to_string(), why);
                }
            }
            Err(e) => tracing::debug!(node = name, error = %e, "reading a soaking Node"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

    fn node(conditions: Option<Vec<(&str, &str)>>) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: conditions.map(|c| {
                    c.into_iter()
                        .map(|(t, s)| NodeCondition {
                            type_: t.into(),
                            status: s.into(),
                            reason: Some("KubeletNotReady".into()),
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_true_ready_condition_is_ready() {
        assert_eq!(
            not_ready(&node(Some(vec![
                ("MemoryPressure", "False"),
                ("Ready", "True")
            ]))),
            None
        );
        let why = not_ready(&node(Some(vec![("Ready", "False")]))).expect("not ready");
        assert!(why.contains("False (KubeletNotReady)"), "{why}");
        let unknown = not_ready(&node(Some(vec![("Ready", "Unknown")]))).expect("unknown");
        assert!(unknown.contains("Unknown"), "{unknown}");
        assert!(not_ready(&node(None)).is_some_and(|w| w.contains("no Ready condition")));
        assert!(not_ready(&Node::default()).is_some());
    }

    #[tokio::test]
    async fn one_get_per_soaking_node_and_an_unreadable_node_judges_nothing() {
        let (client, mut api) = crate::mock_api::client();
        let nodes: Api<Node> = Api::all(client);
        let names = BTreeSet::from(["n1", "n2", "n3"]);
        let reading = tokio::spawn(async move { read(&nodes, &names).await });
        let node_json = |name: &str, status: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": status, "reason": "R"}]}})
        };
        for _ in 0..3 {
            // The GETs go out together: answer each by its path.
            api.respond(|seen| {
                assert_eq!(seen.method, "GET", "{}", seen.uri);
                match seen.path() {
                    "/api/v1/nodes/n1" => (200, node_json("n1", "True")),
                    "/api/v1/nodes/n2" => (200, node_json("n2", "False")),
                    "/api/v1/nodes/n3" => (500, serde_json::Value::Null),
                    other => panic!("unexpected {other}"),
                }
            })
            .await;
        }
        api.expect_silence().await;
        let not_ready = reading.await.expect("read");
        assert_eq!(not_ready.keys().collect::<Vec<_>>(), ["n2"]);
        assert!(not_ready["n2"].contains("False (R)"), "{not_ready:?}");
    }

    #[test]
    fn soaking_nodes_come_from_the_newest_status_of_rolled_out_profiles() {
        use crate::api::rollout::{RolloutSpec, RolloutStatus, SoakingNode};
        let with_soaking = |names: &[&str]| crate::api::NodeTuningProfileStatus {
            rollout: Some(RolloutStatus {
                soaking: names
                    .iter()
                    .map(|n| SoakingNode {
                        name: n.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut web = NodeTuningProfile::test("web");
        web.spec.rollout = Some(RolloutSpec::default());
        web.status = Some(with_soaking(&["n1"]));
        let mut plain = NodeTuningProfile::test("plain");
        plain.status = Some(with_soaking(&["n9"]));
        assert_eq!(
            soaking(&[&web, &plain], |_| None),
            BTreeSet::from(["n1"]),
            "a profile without spec.rollout soaks nothing"
        );
        let written = with_soaking(&["n2", "n3"]);
        assert_eq!(
            soaking(&[&web], |n| (n == "web").then_some(&written)),
            BTreeSet::from(["n2", "n3"])
        );
    }
}
