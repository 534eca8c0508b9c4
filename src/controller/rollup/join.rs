//! The pass's join of nodes to their reports, done once per pass instead of once per profile.
//!
//! A roll-up walks the nodes its profile selects and reads each one's report digest. Looking the
//! digest up by node name per profile hashed every name and chased its key behind an `Arc` (at
//! 20,000 nodes and 5 profiles, 100,000 look-ups a pass), and the cost per node grew with the
//! cluster as the index left the cache. Here every node is joined to its digest once, in node
//! order, and each profile's selection is a list of ascending positions in that join: the
//! roll-ups read two arrays front to back. Pure.
use std::collections::BTreeMap;

use crate::api::NodeTuningProfile;
use crate::controller::cache::{ReportDigest, Reports};
use crate::plan::{NodeLabels, Selected};
use crate::selector::{LabelSet, SelectorError};

/// Every node of a pass in name order, with its labels and its report digest (None: the node
/// has not reported yet).
pub struct Joined<'n> {
    names: Vec<&'n str>,
    labels: Vec<&'n LabelSet>,
    reports: Vec<Option<&'n ReportDigest>>,
}

/// The nodes one profile selects, as ascending positions in a [`Joined`], or why its selector
/// cannot be evaluated (then it selects no node).
pub type Rows = Result<Vec<u32>, SelectorError>;

impl<'n> Joined<'n> {
    /// One look-up per node; reports of nodes that are not (or no longer) in `nodes` are left
    /// out, as the roll-up never reads them.
    pub fn new(nodes: &'n NodeLabels<'_>, reports: &'n Reports) -> Self {
        let mut joined = Joined {
            names: Vec::with_capacity(nodes.len()),
            labels: Vec::with_capacity(nodes.len()),
            reports: Vec::with_capacity(nodes.len()),
        };
        for (name, labels) in nodes {
            joined.names.push(name.as_ref());
            joined.labels.push(labels.as_ref());
            joined
                .reports
                .push(reports.get(name.as_ref()).map(|r| &**r));
        }
        joined
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The node at `row` and its report.
    pub fn row(&self, row: u32) -> (&'n str, Option<&'n ReportDigest>) {
        let i = row as usize;
        (self.names[i], self.reports[i])
    }

    /// The rows `p` selects ([`crate::plan::selects`], the agent's own rule).
    pub fn select(&self, p: &NodeTuningProfile) -> Rows {
        let mut rows = Vec::new();
        for (i, labels) in self.labels.iter().enumerate() {
            if crate::plan::selects(p, *labels)? {
                // Positions fit: a cluster has far fewer than 2^32 nodes.
                rows.push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        Ok(rows)
    }

    /// For every profile, the rows it selects: each selector evaluated once per pass.
    pub fn selection<'p>(
        &self,
        profiles: impl IntoIterator<Item = &'p NodeTuningProfile>,
    ) -> BTreeMap<&'p str, Rows> {
        profiles
            .into_iter()
            .map(|p| {
                (
                    p.metadata.name.as_deref().unwrap_or_default(),
                    self.select(p),
                )
            })
            .collect()
    }

    /// The selected nodes by name, for the plans that read names (labels, finalizers,
    /// rollouts).
    pub fn names(&self, rows: &Rows) -> Selected<'n> {
        rows.as_ref()
            .map(|r| r.iter().map(|i| self.row(*i).0).collect())
            .map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::{KeyState, NodeTuningReport, SysctlEntry};
    use crate::controller::cache::reports_of;
    use crate::controller::rollup::{RollupInput, rollup, rollup_all, rollup_joined};
    use crate::test_fixtures::{entry, nodes};

    fn failing(key: &str, profile: &str) -> SysctlEntry {
        SysctlEntry {
            message: Some("EINVAL".into()),
            ..entry(key, profile, KeyState::Failed)
        }
    }

    fn at(secs: i64) -> Option<Time> {
        Some(Time(
            Timestamp::from_second(1_800_000_000 + secs).expect("ts"),
        ))
    }

    /// The same roll-up, whether each profile looks its nodes' reports up by name (before) or
    /// reads them from the pass's join: nodes without a report, reports of nodes no profile
    /// selects, a report of a node the cache does not know, a failing node, an old generation,
    /// a selector that cannot be evaluated, a profile that selects nothing.
    #[test]
    fn the_join_rolls_up_as_the_look_up_did() {
        let web: &[(&str, &str)] = &[("role", "web")];
        let db: &[(&str, &str)] = &[("role", "db")];
        let n = nodes(&[
            ("a", web),
            ("b", web),
            ("c", db),
            ("d", web),
            ("e", &[]),
            ("f", db),
        ]);
        let mut b = NodeTuningReport::test("b").listing(&["web"]);
        b.status_mut().sysctls = vec![failing("net.ipv4.tcp_tw_recycle", "web")];
        b.status_mut().last_report_time = at(5);
        let mut d = NodeTuningReport::test("d").listing(&["web", "db"]);
        d.status_mut().profiles[0].generation = 0;
        d.status_mut().tcp.total = [("TIME_WAIT".to_string(), 9)].into();
        let reports = reports_of([
            &NodeTuningReport::test("a").listing(&["web"]),
            &b,
            &NodeTuningReport::test("c").listing(&["db"]),
            &d,
            &NodeTuningReport::test("e").holding(&["vm.swappiness"]),
            // f has no report; "gone" is no node of the cache.
            &NodeTuningReport::test("gone").listing(&["web"]),
        ]);
        let profiles = [
            NodeTuningProfile::test("web")
                .selecting(&["role=web"])
                .with_generation(1),
            NodeTuningProfile::test("db")
                .selecting(&["role=db"])
                .with_generation(1),
            NodeTuningProfile::test("bad")
                .with_bad_selector()
                .with_generation(1),
            NodeTuningProfile::test("none")
                .selecting(&["role=cache"])
                .with_generation(1),
        ];
        let joined = Joined::new(&n, &reports);
        assert_eq!(joined.len(), 6);
        let rows = joined.selection(&profiles);
        let by_name = crate::plan::selection(&profiles, &n);
        assert_eq!(rows["web"], Ok(vec![0, 1, 3]));
        for p in &profiles {
            let name = p.metadata.name.as_deref().expect("name");
            assert_eq!(joined.names(&rows[name]), by_name[name], "{name}");
            let now = Timestamp::from_second(1_800_000_100).expect("ts");
            let before = rollup(p, None, &by_name[name], &reports, now);
            let after = rollup_joined(p, None, &rows[name], &joined, now);
            assert_eq!(before, after, "{name}");
        }
        // All profiles in one walk over the nodes: the same statuses again.
        let now = Timestamp::from_second(1_800_000_100).expect("ts");
        let inputs: Vec<RollupInput<'_>> = profiles
            .iter()
            .map(|p| RollupInput {
                profile: p,
                previous: None,
                rows: &rows[p.metadata.name.as_deref().expect("name")],
            })
            .collect();
        let together = rollup_all(&inputs, &joined, now);
        for (p, status) in profiles.iter().zip(&together) {
            let name = p.metadata.name.as_deref().expect("name");
            assert_eq!(
                *status,
                rollup(p, None, &by_name[name], &reports, now),
                "{name}"
            );
        }
        // The mixed set did exercise every case: failing, pending and applied nodes.
        let web = rollup_joined(
            &profiles[0],
            None,
            &rows["web"],
            &joined,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            (
                web.matched_nodes,
                web.applied_nodes,
                web.failed_nodes,
                web.pending_nodes
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(web.tcp_states.get("TIME_WAIT"), Some(&9));
        assert!(rows["bad"].is_err());
    }
}
