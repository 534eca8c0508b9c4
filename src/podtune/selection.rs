//! Which pods each pod-targeting profile selects on one node, and what each pod must hold.
use std::collections::{BTreeMap, BTreeSet};

use super::pod::{PodInfo, PodRef};
use crate::api::{KeyState, NodeTuningProfile, Scope};
use crate::plan::{self, Merged, Rejected};
use crate::selector::{self, SelectorError};
use crate::sysctl::{Policy, SysctlKey};

/// A key the pod sets itself in `securityContext.sysctls`: the pod's value stays (see the
/// module docs of [`crate::podtune`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOwned {
    pub key: String,
    pub profile: String,
    /// What the profile asks for.
    pub desired: String,
    /// What the pod sets.
    pub pod_value: String,
}

impl PodOwned {
    /// Whether the pod's value is the profile's (then there is nothing to report).
    pub fn agrees(&self) -> bool {
        crate::sysctl::value::same(&self.pod_value, &self.desired)
    }

    /// The conflict as the report states it, naming the pod and both values.
    pub fn message(&self, pod: &PodRef) -> String {
        format!(
            "pod {pod} sets {}={} in securityContext.sysctls; profile {} wants {}: the pod's own \
             setting wins",
            self.key, self.pod_value, self.profile, self.desired
        )
    }
}

/// What one selected pod's network namespace must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub pod: PodRef,
    /// The keys to apply inside the pod's namespace (through [`crate::plan::execute`]), with
    /// the overrides between the pod's profiles. `rejected` is always empty: see `refused`.
    pub merged: Merged,
    /// Keys never written to this pod: malformed, denied (built-in or cluster policy), or not
    /// `NetworkNamespace`-scoped. Reported with their state and reason, not evaluated in the
    /// namespace: a `vm.*` key would read the host's value there and look applicable.
    pub refused: Vec<Rejected>,
    /// Keys the pod sets itself; conflicts are those that do not [`PodOwned::agrees`].
    pub pod_owned: Vec<PodOwned>,
}

/// The plan for every tunable pod of one node that some pod-targeting profile selects.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodePodPlan {
    /// In the order the pods were given.
    pub pods: Vec<PodPlan>,
    /// Profiles whose node, pod or namespace selector cannot be evaluated: they select no pod.
    pub selector_errors: Vec<(String, SelectorError)>,
}

fn name_of(p: &NodeTuningProfile) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Whether `p` selects `pod` by its pod and namespace selectors (an absent one selects all).
fn selects_pod(p: &NodeTuningProfile, pod: &PodInfo) -> Result<bool, SelectorError> {
    Ok(
        selector::matches(p.spec.pod_selector.as_ref(), &pod.labels)?
            && selector::matches(p.spec.namespace_selector.as_ref(), &pod.namespace_labels)?,
    )
}

/// Plan the pods of a node with `node_labels`. `profiles` may hold every profile the agent
/// knows: host profiles are ignored here, pod-targeting ones count when their `nodeSelector`
/// selects the node (as [`crate::plan::selects`] decides for the host) and their pod and
/// namespace selectors select the pod. Each pod's profiles merge by priority as the host's do.
pub fn plan_pods<'a>(
    node_labels: &BTreeMap<String, String>,
    profiles: impl IntoIterator<Item = &'a NodeTuningProfile>,
    pods: &[PodInfo],
    policy: &Policy,
) -> NodePodPlan {
    let (on_node, mut selector_errors) = plan::matching(
        profiles.into_iter().filter(|p| p.spec.targets_pods()),
        node_labels,
    );
    let mut broken = BTreeSet::new();
    // Pods selected by the same profiles share one merge.
    let mut merges: BTreeMap<Vec<usize>, Merged> = BTreeMap::new();
    let mut out = Vec::new();
    for pod in pods.iter().filter(|p| p.is_tunable()) {
        let mut chosen = Vec::new();
        for (i, p) in on_node.iter().enumerate() {
            match selects_pod(p, pod) {
                Ok(true) => chosen.push(i),
                Ok(false) => {}
                Err(e) => {
                    if broken.insert(i) {
                        selector_errors.push((name_of(p), e));
                    }
                }
            }
        }
        chosen.retain(|i| !broken.contains(i));
        if chosen.is_empty() {
            continue;
        }
        let merged = merges
            .entry(chosen.clone())
            .or_insert_with(|| plan::merge_by_priority(chosen.iter().map(|&i| on_node[i])))
            .clone();
        out.push(judge(pod, merged, policy));
    }
    NodePodPlan {
        pods: out,
        selector_errors,
    }
}

/// Why `key` may not be set in a pod's namespace, if it may not.
pub(super) fn refusal(key: &SysctlKey, value: &str, policy: &Policy) -> Option<(KeyState, String)> {
    let scope = key.scope();
    if scope != Scope::NetworkNamespace {
        return Some((
            KeyState::Denied,
            format!(
                "sysctl {}: scope {}, not NetworkNamespace: a pod-targeting profile sets keys only \
                 inside pods' network namespaces, and this key is not one of them (it is never \
                 applied to the host instead)",
                key.dotted(),
                scope.as_str()
            ),
        ));
    }
    policy.check(key, value).err().map(|r| (r.state, r.message))
}

/// Split one pod's merge into what to apply, what to refuse and what the pod sets itself.
fn judge(pod: &PodInfo, mut merged: Merged, policy: &Policy) -> PodPlan {
    // The pod's own names in canonical form; a name that does not parse cannot collide.
    let pod_set: BTreeMap<String, &String> = pod
        .sysctls
        .iter()
        .filter_map(|(k, v)| SysctlKey::parse(k).ok().map(|k| (k.dotted(), v)))
        .collect();
    let mut refused = std::mem::take(&mut merged.rejected);
    let mut pod_owned = Vec::new();
    merged.desired.retain(|key, d| {
        if let Some((state, message)) = refusal(&d.key, &d.value, policy) {
            refused.push(Rejected {
                key: key.clone(),
                profile: d.profile.clone(),
                value: d.value.clone(),
                state,
                message,
            });
            return false;
        }
        if let Some(v) = pod_set.get(key) {
            pod_owned.push(PodOwned {
                key: key.clone(),
                profile: d.profile.clone(),
                desired: d.value.clone(),
                pod_value: (*v).clone(),
            });
            return false;
        }
        true
    });
    PodPlan {
        pod: pod.pod_ref(),
        merged,
        refused,
        pod_owned,
    }
}

#[cfg(test)]
mod tests;
