//! Builders and readers for the objects the end-to-end tests write and check: one place for
//! how a test profile looks and how a status is read, so the scenarios say only what differs.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use nodetune::api::{
    KeyState, Mode, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport,
    NodeTuningReportStatus, SysctlEntry,
};
use nodetune::conditions::{Type, find, is_true};

/// The node label the test clusters give their simulated nodes; profiles select on it.
pub const ROLE: &str = "node.example.com/role";

/// A profile under construction: `profile("web").role("web").sysctls(&[..]).build()`.
/// Restores on removal unless told otherwise, like the shipped default.
pub struct ProfileBuilder(NodeTuningProfile);

/// Starts a profile named `name` with no selector, priority 0, no keys.
pub fn profile(name: &str) -> ProfileBuilder {
    ProfileBuilder(NodeTuningProfile::new(
        name,
        NodeTuningProfileSpec {
            restore_on_removal: true,
            ..Default::default()
        },
    ))
}

impl ProfileBuilder {
    /// Selects nodes whose `ROLE` label is `role`.
    pub fn role(self, role: &str) -> Self {
        self.selecting(ROLE, role)
    }

    /// Selects nodes by one label (replacing any earlier selector).
    pub fn selecting(mut self, key: &str, value: &str) -> Self {
        self.0.spec.node_selector = Some(LabelSelector {
            match_labels: Some([(key.to_string(), value.to_string())].into()),
            ..Default::default()
        });
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.0.spec.priority = priority;
        self
    }

    pub fn sysctls(mut self, pairs: &[(&str, &str)]) -> Self {
        self.0.spec.sysctls = map(pairs);
        self
    }

    /// Targets the network namespaces of the pods with this one label, not the host.
    pub fn pods(mut self, key: &str, value: &str) -> Self {
        self.0.spec.pod_selector = Some(LabelSelector {
            match_labels: Some([(key.to_string(), value.to_string())].into()),
            ..Default::default()
        });
        self
    }

    /// Reports what would change and writes nothing.
    pub fn dry_run(mut self) -> Self {
        self.0.spec.mode = Mode::DryRun;
        self
    }

    /// `restoreOnRemoval: false`: the value stays when the profile stops applying.
    pub fn keep_on_removal(mut self) -> Self {
        self.0.spec.restore_on_removal = false;
        self
    }

    pub fn build(self) -> NodeTuningProfile {
        self.0
    }
}

/// Key/value pairs as the map sysctl readers and profiles use.
pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// (status, message) of a profile condition by its type name.
pub fn condition(p: &NodeTuningProfile, type_: &str) -> Option<(String, String)> {
    condition_full(p, type_).map(|(s, _, m)| (s, m))
}

/// (status, reason, message) of a profile condition by its type name.
pub fn condition_full(p: &NodeTuningProfile, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn condition_true(p: &NodeTuningProfile, type_: &str) -> bool {
    condition(p, type_).is_some_and(|c| c.0 == "True")
}

pub fn condition_message(p: &NodeTuningProfile, type_: &str) -> String {
    condition(p, type_).map(|c| c.1).unwrap_or_default()
}

/// The status speaks of the profile's current generation.
pub fn is_current(p: &NodeTuningProfile) -> bool {
    p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
}

/// Ready=True for `generation`, both on the status and on the Ready condition.
pub fn ready_at(p: &NodeTuningProfile, generation: i64) -> bool {
    let Some(s) = p.status.as_ref() else {
        return false;
    };
    s.observed_generation == Some(generation)
        && is_true(&s.conditions, Type::Ready)
        && find(&s.conditions, Type::Ready).and_then(|c| c.observed_generation) == Some(generation)
}

/// (matched, applied, failed) nodes of a profile.
pub fn counts(p: &NodeTuningProfile) -> (i32, i32, i32) {
    p.status
        .as_ref()
        .map(|s| (s.matched_nodes, s.applied_nodes, s.failed_nodes))
        .unwrap_or_default()
}

/// The report's entry for `key` in `state`.
pub fn report_entry<'a>(
    r: &'a NodeTuningReport,
    key: &str,
    state: KeyState,
) -> Option<&'a SysctlEntry> {
    r.status
        .as_ref()?
        .sysctls
        .iter()
        .find(|e| e.key == key && e.state == state)
}

/// The report's entry for `key` from `profile`.
pub fn profile_entry<'a>(
    s: &'a NodeTuningReportStatus,
    key: &str,
    profile: &str,
) -> Option<&'a SysctlEntry> {
    s.sysctls
        .iter()
        .find(|e| e.key == key && e.profile.as_deref() == Some(profile))
}

/// The generation of `profile` the report says the node applied.
pub fn report_generation(r: &NodeTuningReport, profile: &str) -> Option<i64> {
    r.status
        .as_ref()?
        .profiles
        .iter()
        .find(|p| p.name == profile)
        .map(|p| p.generation)
}
