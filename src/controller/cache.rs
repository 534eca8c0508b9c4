//! What the controller keeps of each watched object: a compact digest per node instead of the
//! objects. Reports are most of its memory at scale (one per node, tens of keys each), and a kept
//! object is a tree of small heap allocations (metadata, entries, TCP maps) that also scatters
//! the roll-up's working set. A [`ReportDigest`] holds only what the roll-up, the label plan and
//! the finalizer read (per-profile standing, overridden keys with their winners, failing keys,
//! the held-originals flag, TIME_WAIT pressure, TCP totals as fixed arrays, the report time);
//! names that repeat on every node (profiles, keys) are interned. Of Nodes, the labels.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;

use crate::api::{Mode, NodeTuningReport, NodeTuningReportStatus};
use crate::selector::LabelSet;
use crate::tcpstat::TcpState;

pub use super::rollup::standing::FailedKey;

/// Most state names outside [`TcpState::ALL`] kept per report (the field is untrusted input;
/// an agent writes none).
pub const MAX_OTHER_STATES: usize = 16;
/// Longest failure message kept: one byte past what a node summary shows, so a message that
/// would not fit is still known not to fit (see `standing::failed_message`).
const MAX_KEPT_MESSAGE: usize = super::rollup::standing::MAX_NODE_MESSAGE + 1;

/// Report digests by node (= report) name.
pub type Reports = HashMap<Arc<str>, Arc<ReportDigest>>;

/// Shares one allocation per distinct string: profile names, keys and winners repeat on every
/// node, so 20,000 reports hold a few hundred strings instead of hundreds of thousands.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    /// Size after the last sweep: the next one runs when the set has doubled.
    swept_at: usize,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        self.maybe_sweep();
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    /// Drops strings no digest holds any more (deleted profiles, renamed keys), amortised.
    fn maybe_sweep(&mut self) {
        if self.strings.len() >= 2 * self.swept_at.max(512) {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.swept_at = self.strings.len();
        }
    }

    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

/// Socket counts per TCP state: the known states in a fixed array, in [`TcpState::ALL`] order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub known: [i64; TcpState::ALL.len()],
    /// Bit i: the report listed `TcpState::ALL[i]` (the pods' sums show only listed states).
    pub listed: u16,
    /// States outside [`TcpState::ALL`], as sent (at most [`MAX_OTHER_STATES`]).
    pub other: Box<[(Box<str>, i64)]>,
}

impl Counts {
    pub fn of(map: &BTreeMap<String, i64>) -> Self {
        let mut c = Counts::default();
        let mut other = Vec::new();
        for (state, n) in map {
            match TcpState::ALL.iter().position(|s| s.as_str() == state) {
                Some(i) => {
                    c.known[i] = *n;
                    c.listed |= 1 << i;
                }
                None if other.len() < MAX_OTHER_STATES => {
                    other.push((state.as_str().into(), *n));
                }
                None => {}
            }
        }
        c.other = other.into_boxed_slice();
        c
    }
}

/// An overridden key and the profile that wins it, if the report names one.
pub type Override = (Arc<str>, Option<Arc<str>>);

/// One profile as a node's report lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileDigest {
    pub name: Arc<str>,
    /// The generation the node's agent acted on.
    pub generation: i64,
    pub dry_run: bool,
    /// This profile's keys another profile wins here.
    pub overridden: Box<[Override]>,
    /// This profile's failing keys on the node.
    pub failed: Box<[FailedKey]>,
    /// The rollout revision the node runs of this profile (profiles with `spec.rollout`).
    pub revision: Option<i64>,
    /// Pod-targeting profiles: each key across the node's selected pods.
    pub pod_keys: Box<[PodKeyCounts]>,
}

/// One key of a pod-targeting profile across one node's selected pods: pods, applied,
/// conflicts, failed (the report's `podSysctls` entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodKeyCounts {
    pub key: Arc<str>,
    pub counts: [i64; 4],
}

/// What the controller keeps of one node's report (one with a status; one without is as good as
/// none: the node has not reported yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportDigest {
    pub profiles: Box<[ProfileDigest]>,
    /// The agent still holds original values to restore.
    pub held_originals: bool,
    /// The report's TimeWaitPressure condition is True.
    pub time_wait_pressure: bool,
    pub last_report: Option<Timestamp>,
    /// Both families, host namespace.
    pub tcp: Counts,
    /// The node's pods, summed by the agent (nothing listed when it sent none).
    pub pod_tcp: Counts,
    /// Profiles with a key contested on the node (someone else keeps writing it).
    pub contested: Box<[Arc<str>]>,
    /// The kernel's TCP damage counters' rates per minute, by counter name (a rollout's guards
    /// read them); at most [`crate::api::report::MAX_TCP_COUNTERS`] kept.
    pub rates: Box<[(Arc<str>, i64)]>,
    /// TIME_WAIT and its cap (`tcp_max_tw_buckets`), when the cap is known: a rollout's
    /// headroom guard reads them.
    pub time_wait: Option<(i64, i64)>,
}

impl ReportDigest {
    /// The digest of a report, or None when it has no status yet.
    pub fn of(report: &NodeTuningReport, names: &mut Interner) -> Option<Self> {
        report.status.as_ref().map(|s| Self::of_status(s, names))
    }

    pub fn of_status(s: &NodeTuningReportStatus, names: &mut Interner) -> Self {
        Self {
            profiles: s
                .profiles
                .iter()
                .map(|p| profile_digest(s, p, names))
                .collect(),
            held_originals: !s.held_originals.is_empty(),
            time_wait_pressure: crate::conditions::is_true(
                &s.conditions,
                crate::conditions::Type::TimeWaitPressure,
            ),
            last_report: s.last_report_time.as_ref().map(|t| t.0),
            tcp: Counts::of(&s.tcp.total),
            pod_tcp: s
                .pods
                .as_ref()
                .map(|p| Counts::of(&p.states))
                .unwrap_or_default(),
            contested: contested_profiles(s, names),
            rates: rates(s, names),
            time_wait: Some((s.sockstat.time_wait, s.sockstat.max_tw_buckets))
                .filter(|(_, max)| *max > 0),
        }
    }

    /// The digest of the profile `name`, if the report lists it.
    pub fn profile(&self, name: &str) -> Option<&ProfileDigest> {
        self.profiles.iter().find(|p| &*p.name == name)
    }

    /// Nothing left for the node's agent to restore: no profile listed, no original held.
    pub fn nothing_to_restore(&self) -> bool {
        !self.held_originals && self.profiles.is_empty()
    }
}

fn profile_digest(
    s: &NodeTuningReportStatus,
    p: &crate::api::AppliedProfile,
    names: &mut Interner,
) -> ProfileDigest {
    let overridden = p
        .overridden_keys
        .iter()
        .map(|k| {
            let winner = s
                .sysctls
                .iter()
                .find(|e| &e.key == k)
                .and_then(|e| e.profile.as_deref())
                .map(|w| names.intern(w));
            (names.intern(k), winner)
        })
        .collect();
    let pod_entries = || {
        s.pod_sysctls
            .iter()
            .filter(|e| e.profile == p.name)
            .take(crate::api::profile::MAX_SYSCTLS)
    };
    let mut failed: Vec<FailedKey> = s
        .sysctls
        .iter()
        .filter(|e| e.profile.as_deref() == Some(p.name.as_str()) && e.is_failure())
        .map(|e| FailedKey {
            key: names.intern(&e.key),
            state: e.state,
            message: e.message.as_deref().map(kept_message),
        })
        .collect();
    failed.extend(pod_entries().filter_map(|e| pod_failure(e, names)));
    let pod_keys = pod_entries()
        .map(|e| PodKeyCounts {
            key: names.intern(&e.key),
            counts: [e.pods, e.applied, e.conflicts, e.failed].map(|n| i64::from(n.max(0))),
        })
        .collect();
    ProfileDigest {
        name: names.intern(&p.name),
        generation: p.generation,
        dry_run: p.mode == Mode::DryRun,
        overridden,
        failed: failed.into_boxed_slice(),
        revision: p.revision,
        pod_keys,
    }
}

/// A key some selected pods failed, as a failing key of the node: its state and message those
/// of the first pod named, with how many pods failed.
fn pod_failure(e: &crate::api::PodSysctlEntry, names: &mut Interner) -> Option<FailedKey> {
    if e.failed <= 0 {
        return None;
    }
    let first = e.named.iter().find(|o| o.state.is_failure());
    let message = match first {
        Some(o) => format!(
            "{} of {} pods, first {}/{}: {}",
            e.failed, e.pods, o.namespace, o.name, o.message
        ),
        None => format!("{} of {} pods", e.failed, e.pods),
    };
    Some(FailedKey {
        key: names.intern(&e.key),
        state: first.map_or(crate::api::KeyState::Failed, |o| o.state),
        message: Some(kept_message(&message)),
    })
}

/// The profiles named by the report's contested keys, once each (bounded like the list).
fn contested_profiles(s: &NodeTuningReportStatus, names: &mut Interner) -> Box<[Arc<str>]> {
    let mut out: Vec<Arc<str>> = Vec::new();
    for c in s.contested.iter().take(crate::api::MAX_CONTESTED) {
        if let Some(p) = c.profile.as_deref()
            && !out.iter().any(|o| &**o == p)
        {
            out.push(names.intern(p));
        }
    }
    out.into_boxed_slice()
}

/// The damage counters' per-minute rates (those with one), bounded.
fn rates(s: &NodeTuningReportStatus, names: &mut Interner) -> Box<[(Arc<str>, i64)]> {
    s.tcp_counters
        .iter()
        .flat_map(|c| c.counters.iter())
        .filter_map(|v| Some((names.intern(&v.name), v.per_minute?)))
        .take(crate::api::report::MAX_TCP_COUNTERS)
        .collect()
}

/// A kernel message cut to what a summary can use (see [`MAX_KEPT_MESSAGE`]).
fn kept_message(m: &str) -> Box<str> {
    let mut end = m.len().min(MAX_KEPT_MESSAGE);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m[..end].into()
}

/// The labels of a Node (its metadata as a metadata-only watch gives it), interned: keys and
/// most values repeat on every node. Nothing else of a Node is read (the selection and the
/// agent label).
pub fn node_labels(n: &PartialObjectMeta<Node>, names: &mut Interner) -> LabelSet {
    LabelSet::new(
        n.metadata
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| (names.intern(k), names.intern(v))),
    )
}

/// What the controller keeps of a Node: its labels, and the rollout revisions assigned to it
/// (its `nodetune.dev/revisions` annotation, parsed; empty for most nodes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDigest {
    pub labels: LabelSet,
    pub revisions: BTreeMap<String, i64>,
}

/// The digest of a Node (its metadata as a metadata-only watch gives it).
pub fn node_digest(n: &PartialObjectMeta<Node>, names: &mut Interner) -> NodeDigest {
    let annotation = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::api::rollout::REVISIONS_ANNOTATION));
    NodeDigest {
        labels: node_labels(n, names),
        revisions: annotation
            .map(|v| crate::api::rollout::parse_assignments(Some(v)))
            .unwrap_or_default(),
    }
}

/// Digests of whole reports, by name: what tests and benchmarks feed the pure roll-up with.
pub fn reports_of<'a>(reports: impl IntoIterator<Item = &'a NodeTuningReport>) -> Reports {
    let mut names = Interner::default();
    reports
        .into_iter()
        .filter_map(|r| {
            let name = r.metadata.name.as_deref().unwrap_or_default();
            let d = ReportDigest::of(r, &mut names)?;
            Some((Arc::from(name), Arc::new(d)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::{KeyState, Scope, SysctlEntry};
    use crate::controller::labels::tests::report;
    use crate::controller::labels::{NodeLabels, nothing_to_restore};
    use crate::controller::rollup::rollup;

    fn entry(key: &str, profile: &str, state: KeyState, message: &str) -> SysctlEntry {
        SysctlEntry {
            key: key.into(),
            desired: Some("1".into()),
            actual: Some("1".into()),
            original: Some("0".into()),
            profile: Some(profile.into()),
            scope: Scope::NetworkNamespace,
            optional: false,
            state,
            message: Some(message.into()),
        }
    }

    /// A report of "web" and "fast" on `node`: one key of web overridden by fast, one failing.
    fn busy(node: &str, message: &str) -> NodeTuningReport {
        let mut r = report(node, &["web", "fast"], &["a", "b", "c"]);
        if let Some(s) = r.status.as_mut() {
            s.profiles[0].overridden_keys = vec!["net.ipv4.tcp_fin_timeout".into()];
            s.sysctls = vec![
                entry("net.ipv4.tcp_fin_timeout", "fast", KeyState::Applied, "ok"),
                entry("net.ipv4.tcp_tw_reuse", "web", KeyState::Applied, "ok"),
                entry(
                    "net.ipv4.tcp_tw_recycle",
                    "web",
                    KeyState::Unsupported,
                    message,
                ),
            ];
            s.tcp.total = [("TIME_WAIT".to_string(), 7), ("BOGUS".to_string(), 2)].into();
            s.warnings = vec!["w".into()];
        }
        r
    }

    #[test]
    fn a_digest_keeps_what_the_roll_up_reads_and_shares_repeated_names() {
        let mut names = Interner::default();
        let a = ReportDigest::of(&busy("n1", "EINVAL"), &mut names).expect("status");
        let b = ReportDigest::of(&busy("n2", "EINVAL"), &mut names).expect("status");
        let web = a.profile("web").expect("web");
        assert_eq!(web.generation, 1);
        assert_eq!(
            web.overridden.as_ref(),
            [("net.ipv4.tcp_fin_timeout".into(), Some("fast".into()))]
        );
        assert_eq!(web.failed.len(), 1);
        assert_eq!(&*web.failed[0].key, "net.ipv4.tcp_tw_recycle");
        assert!(a.profile("fast").is_some_and(|p| p.failed.is_empty()));
        assert!(a.held_originals && !a.nothing_to_restore());
        // TIME_WAIT is a known state (array slot); BOGUS is kept by name.
        let tw = TcpState::ALL
            .iter()
            .position(|s| *s == TcpState::TimeWait)
            .expect("TIME_WAIT");
        assert_eq!(a.tcp.known[tw], 7);
        assert_eq!(a.tcp.other.as_ref(), [("BOGUS".into(), 2)]);
        // The second node's names are the first node's allocations.
        let web_b = b.profile("web").expect("web");
        assert!(Arc::ptr_eq(&web.name, &web_b.name));
        assert!(Arc::ptr_eq(&web.failed[0].key, &web_b.failed[0].key));
        assert!(Arc::ptr_eq(&web.overridden[0].0, &web_b.overridden[0].0));
    }

    #[test]
    fn a_report_without_status_is_no_report() {
        let mut r = report("n1", &["web"], &[]);
        r.status = None;
        assert_eq!(ReportDigest::of(&r, &mut Interner::default()), None);
        assert!(reports_of([&r]).is_empty());
    }

    #[test]
    fn untrusted_sizes_are_bounded() {
        let long = "é".repeat(400);
        let mut r = busy("n1", &long);
        if let Some(s) = r.status.as_mut() {
            s.tcp.total = (0..100).map(|i| (format!("STATE{i}"), i)).collect();
        }
        let d = ReportDigest::of(&r, &mut Interner::default()).expect("status");
        assert_eq!(d.tcp.other.len(), MAX_OTHER_STATES);
        let kept = d.profile("web").expect("web").failed[0]
            .message
            .clone()
            .expect("message");
        assert!(kept.len() <= MAX_KEPT_MESSAGE && long.starts_with(&*kept));
        // Cut or not, the node's summary says the same: the message does not fit either way.
        let nodes: NodeLabels =
            crate::plan::owned_node_labels([("n1".to_string(), BTreeMap::new())]);
        let mut web = crate::api::NodeTuningProfile::new("web", Default::default());
        web.metadata.generation = Some(1);
        let selection = crate::plan::selection([&web], &nodes);
        let status = rollup(
            &web,
            None,
            &selection["web"],
            &reports_of([&r]),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            status.nodes[0].message.as_deref(),
            Some("net.ipv4.tcp_tw_recycle: Unsupported")
        );
    }

    #[test]
    fn the_label_plan_reads_held_originals_and_profiles_from_the_digest() {
        let reports = reports_of([
            &report("held", &[], &["vm.swappiness"]),
            &report("listed", &["web"], &[]),
            &report("clean", &[], &[]),
        ]);
        let of = |n: &str| nothing_to_restore(reports.get(n).map(|r| &**r));
        assert!(!of("held") && !of("listed"));
        assert!(of("clean") && of("absent"));
    }

    #[test]
    fn the_interner_forgets_strings_no_digest_holds() {
        let mut names = Interner::default();
        let kept = names.intern("kept");
        for i in 0..5000 {
            names.intern(&format!("gone-{i}"));
        }
        assert!(names.len() < 2048, "{}", names.len());
        assert!(Arc::ptr_eq(&kept, &names.intern("kept")));
    }

    #[test]
    fn a_node_keeps_its_labels_only_and_shares_them() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname".to_string(), "n1".to_string()),
            ("role".to_string(), "web".to_string()),
        ]
        .into();
        let n = PartialObjectMeta::<Node> {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some(labels.clone()),
                annotations: Some(
                    [(
                        "csi.volume.kubernetes.io/nodeid".to_string(),
                        "{\"ebs.csi.aws.com\":\"i-0123\"}".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut names = Interner::default();
        let kept = node_labels(&n, &mut names);
        assert_eq!(kept, LabelSet::from(&labels));
        // A second node with the same role shares the key and the value.
        let other = node_labels(&n, &mut names);
        let role = |l: &LabelSet| {
            l.iter()
                .find(|(k, _)| *k == "role")
                .map(|(k, v)| (k.as_ptr(), v.as_ptr()))
        };
        assert_eq!(role(&kept), role(&other));
    }
}
