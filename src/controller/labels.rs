//! Which nodes carry the agent label [`AGENT_NODE_LABEL`]. Pure.
//!
//! A node needs an agent while some profile (not being deleted) selects it, and afterwards for as
//! long as its agent still has something to put back: the label stays until the node's report
//! lists no profile and holds no original value (or there is no report at all), so withdrawing the
//! agent never strands a tuned kernel.
use std::collections::{BTreeMap, BTreeSet};

use super::cache::{ReportDigest, Reports};
use super::render::AGENT_NODE_LABEL;
pub use crate::plan::NodeLabels;
use crate::plan::Selected;
use crate::selector::{LabelLookup, LabelSet};

/// What to change on the nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelPlan {
    /// Nodes that must get the label.
    pub label: BTreeSet<String>,
    /// Nodes whose label must go.
    pub unlabel: BTreeSet<String>,
    /// Labelled nodes no profile selects any more, kept until their agent has restored.
    pub draining: BTreeSet<String>,
    /// Profiles whose selector could not be evaluated: (profile, error).
    pub selector_errors: Vec<(String, String)>,
    /// Label writes over [`MAX_LABEL_WRITES_PER_PASS`], left for the next passes.
    pub deferred: usize,
}

/// Most label writes (adds and removals) one pass sends. A pass waits for its writes, and the
/// next pass (with the status changes it carries) waits for it: at 20,000 newly selected nodes
/// an unbounded pass held every status update back for the minutes the API server took to
/// label them all. With the bound, passes follow each other and each carries fresh statuses.
pub const MAX_LABEL_WRITES_PER_PASS: usize = 256;

impl LabelPlan {
    /// Keeps the first `max` writes (adds first, by node name) and counts the rest deferred.
    fn bound(&mut self, max: usize) {
        let total = self.label.len() + self.unlabel.len();
        if total <= max {
            return;
        }
        self.deferred = total - max;
        let keep_label = self.label.len().min(max);
        truncate(&mut self.label, keep_label);
        truncate(&mut self.unlabel, max - keep_label);
    }
}

/// Keeps the first `n` entries of `set`.
fn truncate(set: &mut BTreeSet<String>, n: usize) {
    if let Some(first_dropped) = set.iter().nth(n).cloned() {
        set.split_off(&first_dropped);
    }
}

/// Whether a node currently carries the agent label.
fn has_agent_label(labels: &LabelSet) -> bool {
    labels.label(AGENT_NODE_LABEL) == Some("true")
}

/// Whether a node's report shows nothing left for its agent to restore.
pub fn nothing_to_restore(report: Option<&ReportDigest>) -> bool {
    report.is_none_or(ReportDigest::nothing_to_restore)
}

/// The label changes that bring `nodes` to the wanted state, given which nodes each profile
/// selects ([`crate::plan::selection`]).
pub fn plan_labels(
    nodes: &NodeLabels<'_>,
    selection: &BTreeMap<&str, Selected<'_>>,
    reports: &Reports,
) -> LabelPlan {
    let mut selected: BTreeSet<&str> = BTreeSet::new();
    let mut selector_errors = Vec::new();
    for (profile, nodes) in selection {
        match nodes {
            Ok(nodes) => selected.extend(nodes.iter().copied()),
            Err(e) => selector_errors.push((profile.to_string(), e.to_string())),
        }
    }
    let mut plan = LabelPlan {
        selector_errors,
        ..Default::default()
    };
    for (node, labels) in nodes {
        let labelled = has_agent_label(labels);
        if selected.contains(node.as_ref()) {
            if !labelled {
                plan.label.insert(node.to_string());
            }
        } else if labelled {
            if nothing_to_restore(reports.get(node.as_ref()).map(|r| &**r)) {
                plan.unlabel.insert(node.to_string());
            } else {
                plan.draining.insert(node.to_string());
            }
        }
    }
    plan.bound(MAX_LABEL_WRITES_PER_PASS);
    plan
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::NodeTuningProfile;
    use crate::api::NodeTuningReport;
    use crate::controller::cache::{Reports, reports_of};
    use crate::plan::selection;

    pub(crate) use crate::test_fixtures::nodes;

    /// A report listing `profiles` and holding the originals of `held`. Kept under this path
    /// for `controller::cache`'s tests; new tests use `NodeTuningReport::test` directly.
    pub(crate) fn report(node: &str, profiles: &[&str], held: &[&str]) -> NodeTuningReport {
        NodeTuningReport::test(node).listing(profiles).holding(held)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    const AGENT: (&str, &str) = (AGENT_NODE_LABEL, "true");

    #[test]
    fn selected_nodes_get_the_label_once() {
        let n = nodes(&[
            ("a", &[("role", "web")]),
            ("b", &[("role", "web"), AGENT]),
            ("c", &[("role", "db")]),
        ]);
        let web = NodeTuningProfile::test("web").selecting(&["role=web"]);
        let plan = plan_labels(&n, &selection([&web], &n), &Reports::new());
        assert_eq!(plan.label, set(&["a"]));
        assert!(plan.unlabel.is_empty() && plan.draining.is_empty());
    }

    #[test]
    fn unselected_nodes_keep_the_label_until_restored() {
        let n = nodes(&[
            ("dirty", &[AGENT]),
            ("held", &[AGENT]),
            ("clean", &[AGENT]),
            ("noreport", &[AGENT]),
            ("wrongvalue", &[(AGENT_NODE_LABEL, "false")]),
        ]);
        let dirty = report("dirty", &["old"], &[]);
        let held = report("held", &[], &["vm.swappiness"]);
        let clean = report("clean", &[], &[]);
        let reports = reports_of([&dirty, &held, &clean]);
        let plan = plan_labels(&n, &selection([], &n), &reports);
        assert!(plan.label.is_empty());
        assert_eq!(plan.unlabel, set(&["clean", "noreport"]));
        assert_eq!(plan.draining, set(&["dirty", "held"]));
    }

    #[test]
    fn one_pass_sends_a_bounded_number_of_label_writes_and_defers_the_rest() {
        let list: Vec<(String, Vec<(&str, &str)>)> = (0..600)
            .map(|i| (format!("n{i:04}"), vec![("role", "web")]))
            .chain((0..100).map(|i| (format!("old{i:03}"), vec![AGENT])))
            .collect();
        let borrowed: Vec<(&str, &[(&str, &str)])> = list
            .iter()
            .map(|(n, l)| (n.as_str(), l.as_slice()))
            .collect();
        let n = nodes(&borrowed);
        let web = NodeTuningProfile::test("web").selecting(&["role=web"]);
        let plan = plan_labels(&n, &selection([&web], &n), &Reports::new());
        assert_eq!(plan.label.len(), MAX_LABEL_WRITES_PER_PASS);
        assert!(plan.unlabel.is_empty());
        assert_eq!(plan.deferred, 600 + 100 - MAX_LABEL_WRITES_PER_PASS);
        assert_eq!(plan.label.first().map(String::as_str), Some("n0000"));
        // Fewer than the bound: everything at once, nothing deferred.
        let small = nodes(&borrowed[..10]);
        let plan = plan_labels(&small, &selection([&web], &small), &Reports::new());
        assert_eq!((plan.label.len(), plan.deferred), (10, 0));
    }

    #[test]
    fn deleting_profiles_select_nothing() {
        let n = nodes(&[("a", &[("role", "web"), AGENT])]);
        let web = NodeTuningProfile::test("web")
            .selecting(&["role=web"])
            .deleted_at(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let r = report("a", &["web"], &["vm.swappiness"]);
        let reports = reports_of([&r]);
        let plan = plan_labels(&n, &selection([&web], &n), &reports);
        assert_eq!(plan.draining, set(&["a"]));
        assert!(plan.unlabel.is_empty());
    }

    #[test]
    fn bad_selector_is_reported_not_fatal() {
        let n = nodes(&[("a", &[("role", "web")])]);
        let bad = NodeTuningProfile::test("bad").with_bad_selector();
        let all = NodeTuningProfile::test("all").selecting(&[]);
        let plan = plan_labels(&n, &selection([&bad, &all], &n), &Reports::new());
        assert_eq!(plan.label, set(&["a"]));
        assert_eq!(plan.selector_errors.len(), 1);
        assert_eq!(plan.selector_errors[0].0, "bad");
    }
}
