//! Pure planning: which profiles apply to a node, and the effective sysctls after merging them
//! by priority. No I/O: the agent and the local commands feed it objects and labels.
use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::api::{KeyState, Mode, NodeTuningProfile, Scope};
use crate::selector::{self, SelectorError};
use crate::sysctl::key::{self, SysctlKey};
use crate::sysctl::{self as engine, KeyResult, Ledger, Policy, SysctlFs, policy};

/// The value a node should hold for one key, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub key: SysctlKey,
    /// Written with a leading `-`: the key may be missing on the node's kernel.
    pub optional: bool,
    pub value: String,
    pub profile: String,
    pub mode: Mode,
    /// The profile's priority: where a DryRun preview would stand against an enforced key.
    pub priority: i32,
}

/// A key a lower-priority profile also sets: it loses to `winner`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overridden {
    pub key: String,
    pub profile: String,
    pub value: String,
    pub winner: String,
}

/// A key no node may take, whatever the profile says (malformed or denied by policy). Admission
/// refuses these; they can still arrive through `nodetune apply --local` or an old CRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: String,
    pub profile: String,
    pub value: String,
    pub state: KeyState,
    pub message: String,
}

/// The merged view for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Canonical key → winning value.
    pub desired: BTreeMap<String, Desired>,
    pub overridden: Vec<Overridden>,
    pub rejected: Vec<Rejected>,
    /// DryRun keys that would win over a key an `Enforce` profile sets, were they enforced.
    /// They never win (a preview must not switch enforcement off): they are evaluated on top
    /// of the enforced value and reported as DryRun. Canonical key → the would-be winner.
    pub previews: BTreeMap<String, Desired>,
}

impl Merged {
    /// Keys of `profile` that another profile overrides.
    pub fn overridden_keys_of(&self, profile: &str) -> Vec<String> {
        self.overridden
            .iter()
            .filter(|o| o.profile == profile)
            .map(|o| o.key.clone())
            .collect()
    }
}

fn name_of(p: &NodeTuningProfile) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

/// Whether `p` applies to a node with `labels`: it is not being deleted (a profile on its way
/// out must release its keys so its finalizer can complete) and its selector matches. The one
/// place that answers "does this profile select this node", for the agent and the controller.
pub fn selects(
    p: &NodeTuningProfile,
    labels: &(impl selector::LabelLookup + ?Sized),
) -> Result<bool, SelectorError> {
    if p.metadata.deletion_timestamp.is_some() {
        return Ok(false);
    }
    selector::matches(p.spec.node_selector.as_ref(), labels)
}

/// Profiles that apply to a node with `labels` (see [`selects`]). A profile whose selector
/// cannot be evaluated is returned in the error list, not silently treated as matching or not.
pub fn matching<'a>(
    profiles: impl IntoIterator<Item = &'a NodeTuningProfile>,
    labels: &BTreeMap<String, String>,
) -> (Vec<&'a NodeTuningProfile>, Vec<(String, SelectorError)>) {
    let mut matched = Vec::new();
    let mut errors = Vec::new();
    for p in profiles {
        match selects(p, labels) {
            Ok(true) => matched.push(p),
            Ok(false) => {}
            Err(e) => errors.push((name_of(p).to_string(), e)),
        }
    }
    (matched, errors)
}

/// The nodes one profile selects (names, in the order given), or why its selector cannot be
/// evaluated: then it selects no node at all, rather than the nodes seen before the error.
pub type Selected<'n> = Result<Vec<&'n str>, SelectorError>;

/// Node name → labels. The controller borrows them from its node cache for one pass: cloning
/// every node's labels on every pass would cost more than the selection itself.
pub type NodeLabels<'a> = BTreeMap<Cow<'a, str>, Cow<'a, selector::LabelSet>>;

/// [`NodeLabels`] that own their names and labels.
pub fn owned_node_labels(
    nodes: impl IntoIterator<Item = (String, BTreeMap<String, String>)>,
) -> NodeLabels<'static> {
    nodes
        .into_iter()
        .map(|(name, labels)| (Cow::Owned(name), Cow::Owned((&labels).into())))
        .collect()
}

/// For every profile, the nodes it selects (see [`selects`]): the cluster-wide view of the same
/// question the agent asks for its own node with [`matching`].
pub fn selection<'a, 'n>(
    profiles: impl IntoIterator<Item = &'a NodeTuningProfile>,
    nodes: &'n NodeLabels<'_>,
) -> BTreeMap<&'a str, Selected<'n>> {
    profiles
        .into_iter()
        .map(|p| {
            let selected = nodes
                .iter()
                .filter_map(|(node, labels)| match selects(p, labels.as_ref()) {
                    Ok(true) => Some(Ok(node.as_ref())),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect();
            (name_of(p), selected)
        })
        .collect()
}

/// The host merge: [`merge_by_priority`] of the profiles that target the host. A profile with
/// `spec.podSelector` or `spec.namespaceSelector` is left out, whatever its keys: its values
/// belong inside pods' network namespaces (see `crate::podtune`), and writing them to the
/// host's would tune every hostNetwork pod and the node itself instead.
pub fn merge<'a>(profiles: impl IntoIterator<Item = &'a NodeTuningProfile>) -> Merged {
    merge_by_priority(profiles.into_iter().filter(|p| !p.spec.targets_pods()))
}

/// Merge profiles: higher `priority` first, then name; the first profile to set a key wins.
/// Keys are compared in canonical form, so `net/ipv4/tcp_fin_timeout` and
/// `net.ipv4.tcp_fin_timeout` collide as they do in the kernel. Used as is for one pod's
/// profiles; the host uses [`merge`].
///
/// `Enforce` profiles are merged first and `DryRun` profiles after them, so a preview never
/// takes a key from an enforced profile: a DryRun key that would outrank the enforced one is
/// a [`Merged::previews`] entry, one that would lose is [`Overridden`], as enforcing it would
/// make it.
pub fn merge_by_priority<'a>(profiles: impl IntoIterator<Item = &'a NodeTuningProfile>) -> Merged {
    let mut ordered: Vec<&NodeTuningProfile> = profiles.into_iter().collect();
    ordered.sort_by(|a, b| rank(a).cmp(&rank(b)));
    let mut merged = Merged::default();
    for mode in [Mode::Enforce, Mode::DryRun] {
        for p in ordered.iter().filter(|p| p.spec.mode == mode) {
            merge_one(&mut merged, p);
        }
    }
    merged
}

/// Sort key of the merge: higher priority first, then name.
/// Whether a key no profile wants any more keeps its value rather than getting its original
/// back: only when `owner`, the profile that set it, still exists and says
/// `restoreOnRemoval: false`. A gone or unknown owner means restore (the safe default). Host
/// keys and pod keys follow the same rule.
pub fn keeps_value_on_removal(owner: Option<&str>, all_profiles: &[&NodeTuningProfile]) -> bool {
    owner
        .and_then(|o| {
            all_profiles
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(o))
        })
        .is_some_and(|p| !p.spec.restore_on_removal)
}

fn rank(p: &NodeTuningProfile) -> (std::cmp::Reverse<i32>, &str) {
    (std::cmp::Reverse(p.spec.priority), name_of(p))
}

/// Adds one profile's keys to `merged`, after every profile that outranks it (and, for a
/// DryRun profile, after every Enforce profile).
fn merge_one(merged: &mut Merged, p: &NodeTuningProfile) {
    let profile = name_of(p).to_string();
    for (raw_key, value) in &p.spec.sysctls {
        let (key, optional) = match key::parse_spec(raw_key) {
            Ok(k) => k,
            Err(e) => {
                merged.rejected.push(Rejected {
                    key: raw_key.clone(),
                    profile: profile.clone(),
                    value: value.clone(),
                    state: KeyState::Invalid,
                    message: e.to_string(),
                });
                continue;
            }
        };
        if let Err(e) = policy::check(&key) {
            merged.rejected.push(Rejected {
                key: key.to_string(),
                profile: profile.clone(),
                value: value.clone(),
                state: KeyState::Denied,
                message: e.to_string(),
            });
            continue;
        }
        let canonical = key.to_string();
        let d = Desired {
            key,
            optional,
            value: value.clone(),
            profile: profile.clone(),
            mode: p.spec.mode,
            priority: p.spec.priority,
        };
        let winner = merged.previews.get(&canonical).or_else(|| {
            merged
                .desired
                .get(&canonical)
                // An enforced key a DryRun profile outranks: the DryRun profile previews it.
                .filter(|w| !(w.mode == Mode::Enforce && outranks(&d, w)))
        });
        if let Some(winner) = winner {
            merged.overridden.push(Overridden {
                key: canonical,
                profile: profile.clone(),
                value: value.clone(),
                winner: winner.profile.clone(),
            });
            continue;
        }
        match merged.desired.entry(canonical) {
            std::collections::btree_map::Entry::Occupied(enforced) => {
                merged.previews.insert(enforced.key().clone(), d);
            }
            std::collections::btree_map::Entry::Vacant(free) => {
                free.insert(d);
            }
        }
    }
}

/// Whether `a` would win over `b` in the merge if both were enforced.
fn outranks(a: &Desired, b: &Desired) -> bool {
    (std::cmp::Reverse(a.priority), a.profile.as_str())
        < (std::cmp::Reverse(b.priority), b.profile.as_str())
}

impl Desired {
    /// The key as the profile wrote it (canonical, with the `-` marker if optional).
    pub fn spec_key(&self) -> String {
        key::spec_string(&self.key, self.optional)
    }
}

/// The step `nodetune apply --local`, `nodetune plan` and the agent's pass share: every winning
/// key applied (or, in `DryRun` mode, evaluated), then every rejected key refused by the engine
/// with the same per-key states, then every DryRun preview evaluated on top of what was just
/// enforced. Results come in that order: `merged.desired` (key order), then `merged.rejected`,
/// then `merged.previews` (key order).
///
/// With `ledger: None` nothing is written: every key is evaluated as a dry run (what `plan`
/// shows), still through [`Policy::check`].
pub fn execute(
    fs: &SysctlFs,
    mut ledger: Option<&mut Ledger>,
    policy: &Policy,
    merged: &Merged,
) -> Vec<KeyResult> {
    let mut results = Vec::with_capacity(merged.desired.len() + merged.rejected.len());
    for d in merged.desired.values() {
        let key = d.spec_key();
        results.push(match (&mut ledger, d.mode) {
            (Some(l), Mode::Enforce) => {
                engine::apply_one(fs, l, &key, &d.value, Some(&d.profile), policy)
            }
            (l, _) => engine::dry_run_one(fs, l.as_deref(), &key, &d.value, policy),
        });
    }
    for r in &merged.rejected {
        results.push(engine::dry_run_one(fs, None, &r.key, &r.value, policy));
    }
    // A key the node lacks is often a typo: name the nearest key it has.
    for (r, d) in results.iter_mut().zip(merged.desired.values()) {
        if r.state == KeyState::Unsupported && !d.optional {
            r.message = engine::suggest::with_hint(r.message.take(), &fs.root, &d.key);
        }
    }
    for (key, d) in &merged.previews {
        let mut r = engine::dry_run_one(fs, ledger.as_deref(), &d.spec_key(), &d.value, policy);
        if let Some(enforced) = merged.desired.get(key) {
            r.message = Some(preview_message(r.message.as_deref(), &enforced.profile));
        }
        results.push(r);
    }
    results
}

/// The dry run's own words, and why the value stays the enforced one.
fn preview_message(evaluated: Option<&str>, enforced_by: &str) -> String {
    let head = evaluated.unwrap_or("evaluated");
    format!(
        "{head} (DryRun preview: profile {enforced_by} enforces this key; a DryRun profile never takes it over)"
    )
}

/// What `apply` would do with one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    None,
    Set,
    Unsupported,
    Denied,
    InvalidKey,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Set => "set",
            Self::Unsupported => "unsupported",
            Self::Denied => "denied",
            Self::InvalidKey => "invalid-key",
        }
    }
}

/// What reading a key's current value gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Current {
    Value(String),
    Missing,
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanItem {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    pub current: Option<String>,
    pub desired: String,
    pub profile: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Desired vs current for every key of `merged`, given what reading each key gave.
pub fn diff(merged: &Merged, current: &BTreeMap<String, Current>) -> Vec<PlanItem> {
    let mut items: Vec<PlanItem> = merged
        .desired
        .iter()
        .map(|(key, d)| {
            let (cur, action, message) = match current.get(key) {
                Some(Current::Value(v)) if crate::sysctl::value::same(v, &d.value) => {
                    (Some(v.clone()), Action::None, None)
                }
                Some(Current::Value(v)) => (Some(v.clone()), Action::Set, None),
                Some(Current::Missing) | None => (
                    None,
                    Action::Unsupported,
                    Some(crate::sysctl::apply::unsupported_message(&d.key)),
                ),
                Some(Current::Unreadable(e)) => (None, Action::Denied, Some(e.clone())),
            };
            PlanItem {
                key: key.clone(),
                scope: Some(d.key.scope()),
                current: cur,
                desired: d.value.clone(),
                profile: d.profile.clone(),
                action,
                message,
            }
        })
        .collect();
    items.extend(merged.rejected.iter().map(|r| PlanItem {
        key: r.key.clone(),
        scope: None,
        current: None,
        desired: r.value.clone(),
        profile: r.profile.clone(),
        action: if r.state == KeyState::Denied {
            Action::Denied
        } else {
            Action::InvalidKey
        },
        message: Some(r.message.clone()),
    }));
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile as the merge tests use it: restoring, at generation 3.
    fn profile(name: &str, priority: i32, sysctls: &[(&str, &str)]) -> NodeTuningProfile {
        NodeTuningProfile::test(name)
            .with_priority(priority)
            .with_sysctls(sysctls)
            .restoring()
            .with_generation(3)
    }

    /// Only an owner that still exists and says `restoreOnRemoval: false` keeps the value; an
    /// unknown, gone or restoring owner gets the original back.
    #[test]
    fn a_value_is_kept_on_removal_only_when_its_living_owner_says_so() {
        let keeping = NodeTuningProfile::test("keep");
        let restoring = NodeTuningProfile::test("restore").restoring();
        let all = [&keeping, &restoring];
        assert!(keeps_value_on_removal(Some("keep"), &all));
        assert!(!keeps_value_on_removal(Some("restore"), &all));
        assert!(!keeps_value_on_removal(Some("gone"), &all));
        assert!(!keeps_value_on_removal(None, &all));
    }

    #[test]
    fn higher_priority_wins_then_name() {
        let low = profile(
            "a-low",
            1,
            &[
                ("net.ipv4.tcp_fin_timeout", "50"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ],
        );
        let high = profile("z-high", 5, &[("net/ipv4/tcp_fin_timeout", "30")]);
        let tie = profile("b-tie", 1, &[("net.ipv4.tcp_tw_reuse", "2")]);
        let merged = merge([&low, &high, &tie]);
        assert_eq!(merged.desired["net.ipv4.tcp_fin_timeout"].value, "30");
        assert_eq!(merged.desired["net.ipv4.tcp_fin_timeout"].profile, "z-high");
        assert_eq!(merged.desired["net.ipv4.tcp_tw_reuse"].profile, "a-low");
        assert_eq!(
            merged.overridden,
            vec![
                Overridden {
                    key: "net.ipv4.tcp_fin_timeout".into(),
                    profile: "a-low".into(),
                    value: "50".into(),
                    winner: "z-high".into()
                },
                Overridden {
                    key: "net.ipv4.tcp_tw_reuse".into(),
                    profile: "b-tie".into(),
                    value: "2".into(),
                    winner: "a-low".into()
                },
            ]
        );
        assert_eq!(
            merged.overridden_keys_of("a-low"),
            vec!["net.ipv4.tcp_fin_timeout".to_string()]
        );
    }

    /// A DryRun profile never takes a key from an Enforce profile, whatever its priority: the
    /// enforced value stays desired (so it is written and drift-corrected) and the preview is
    /// listed on its own; the Enforce profile's key is not `Overridden`.
    #[test]
    fn dry_run_never_wins_over_enforce() {
        const FIN: &str = "net.ipv4.tcp_fin_timeout";
        let enforce = profile("base", 0, &[(FIN, "30"), ("net.ipv4.tcp_tw_reuse", "1")]);
        let preview = profile("try", 10, &[(FIN, "20")]).with_mode(Mode::DryRun);
        let low_preview = profile("later", -5, &[(FIN, "40")]).with_mode(Mode::DryRun);
        let second = profile("try2", 9, &[(FIN, "25")]).with_mode(Mode::DryRun);
        let merged = merge([&preview, &enforce, &low_preview, &second]);
        let fin = &merged.desired[FIN];
        assert_eq!(
            (fin.profile.as_str(), fin.value.as_str(), fin.mode),
            ("base", "30", Mode::Enforce)
        );
        assert!(merged.overridden_keys_of("base").is_empty());
        let p = &merged.previews[FIN];
        assert_eq!((p.profile.as_str(), p.value.as_str()), ("try", "20"));
        // What enforcing them would do: both lose to the preview that outranks them.
        let winners: BTreeMap<&str, &str> = merged
            .overridden
            .iter()
            .map(|o| (o.profile.as_str(), o.winner.as_str()))
            .collect();
        assert_eq!(winners, [("later", "try"), ("try2", "try")].into());
    }

    /// Between DryRun profiles alone the usual rule holds, and a key no Enforce profile sets is
    /// the DryRun profile's to evaluate.
    #[test]
    fn dry_run_profiles_merge_among_themselves() {
        let a = profile("a", 5, &[("vm.swappiness", "1")]).with_mode(Mode::DryRun);
        let b = profile("b", 1, &[("vm.swappiness", "2")]).with_mode(Mode::DryRun);
        let merged = merge([&b, &a]);
        assert_eq!(merged.desired["vm.swappiness"].profile, "a");
        assert_eq!(merged.desired["vm.swappiness"].mode, Mode::DryRun);
        assert!(merged.previews.is_empty());
        assert_eq!(merged.overridden_keys_of("b"), vec!["vm.swappiness"]);
    }

    /// The preview is evaluated after the enforced write, with the engine's dry run: the kernel
    /// keeps the enforced value, and the preview says what it would change and who enforces.
    #[test]
    fn execute_enforces_and_evaluates_the_preview_on_top() {
        let node = crate::test_fixtures::FakeProc::with(&[("net/ipv4/tcp_fin_timeout", "60")]);
        let fs = node.fs();
        let mut ledger = node.ledger();
        let enforce = profile("base", 0, &[("net.ipv4.tcp_fin_timeout", "30")]);
        let preview =
            profile("try", 10, &[("net.ipv4.tcp_fin_timeout", "20")]).with_mode(Mode::DryRun);
        let merged = merge([&enforce, &preview]);
        let results = execute(&fs, Some(&mut ledger), &Policy::default(), &merged);
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].state, KeyState::Applied);
        assert_eq!(results[1].state, KeyState::DryRun);
        assert_eq!(results[1].actual.as_deref(), Some("30"));
        let msg = results[1].message.as_deref().unwrap_or_default();
        assert!(
            msg.contains("\"30\" to \"20\"") && msg.contains("base"),
            "{msg}"
        );
        assert_eq!(node.read("net/ipv4/tcp_fin_timeout"), "30\n");
    }

    #[test]
    fn bad_and_denied_keys_are_rejected_not_dropped() {
        let p = profile(
            "p",
            0,
            &[
                ("kernel.core_pattern", "|/bin/sh"),
                ("Net..x", "1"),
                ("vm.swappiness", "10"),
            ],
        );
        let merged = merge([&p]);
        assert_eq!(merged.desired.len(), 1);
        let states: Vec<KeyState> = merged.rejected.iter().map(|r| r.state).collect();
        assert!(
            states.contains(&KeyState::Denied) && states.contains(&KeyState::Invalid),
            "{states:?}"
        );
    }

    #[test]
    fn pod_targeting_profiles_stay_out_of_the_host_merge() {
        let host = profile("host", 0, &[("net.ipv4.tcp_fin_timeout", "40")]);
        let mut pods = profile(
            "pods",
            9,
            &[
                ("net.ipv4.tcp_fin_timeout", "20"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ],
        );
        pods.spec.pod_selector = crate::selector::from_pairs(&["app=squid".into()]).expect("pair");
        let mut by_ns = profile("by-ns", 9, &[("net.core.somaxconn", "4096")]);
        by_ns.spec.namespace_selector = Some(Default::default());
        let merged = merge([&host, &pods, &by_ns]);
        assert_eq!(
            merged.desired.keys().collect::<Vec<_>>(),
            vec!["net.ipv4.tcp_fin_timeout"]
        );
        assert_eq!(merged.desired["net.ipv4.tcp_fin_timeout"].profile, "host");
        assert!(merged.overridden.is_empty() && merged.rejected.is_empty());
        // Pod planning merges them as the host merge would.
        let all = merge_by_priority([&host, &pods]);
        assert_eq!(all.desired["net.ipv4.tcp_fin_timeout"].profile, "pods");
    }

    #[test]
    fn matching_skips_deleting_and_unselected() {
        let gone = profile("gone", 0, &[("vm.swappiness", "1")])
            .deleted_at(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let web = profile("web", 0, &[("vm.swappiness", "1")]).selecting(&["role=web"]);
        let all = profile("all", 0, &[("vm.swappiness", "1")]);
        let labels: BTreeMap<String, String> = [("role".to_string(), "db".to_string())].into();
        let (m, errs) = matching([&gone, &web, &all], &labels);
        assert!(errs.is_empty());
        assert_eq!(
            m.iter().map(|p| name_of(p)).collect::<Vec<_>>(),
            vec!["all"]
        );
    }

    #[test]
    fn diff_classifies_each_key() {
        let p = profile(
            "p",
            0,
            &[
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("net.ipv4.tcp_fin_timeout", "30"),
                ("net.ipv4.tcp_tw_recycle", "1"),
                ("kernel.modprobe", "/x"),
            ],
        );
        let merged = merge([&p]);
        let current: BTreeMap<String, Current> = [
            (
                "net.ipv4.ip_local_port_range".to_string(),
                Current::Value("1024\t65000".into()),
            ),
            (
                "net.ipv4.tcp_fin_timeout".to_string(),
                Current::Value("60".into()),
            ),
            ("net.ipv4.tcp_tw_recycle".to_string(), Current::Missing),
        ]
        .into();
        let items = diff(&merged, &current);
        let by_key: BTreeMap<&str, Action> =
            items.iter().map(|i| (i.key.as_str(), i.action)).collect();
        assert_eq!(by_key["net.ipv4.ip_local_port_range"], Action::None);
        assert_eq!(by_key["net.ipv4.tcp_fin_timeout"], Action::Set);
        assert_eq!(by_key["net.ipv4.tcp_tw_recycle"], Action::Unsupported);
        assert_eq!(by_key["kernel.modprobe"], Action::Denied);
        let recycle = items
            .iter()
            .find(|i| i.key == "net.ipv4.tcp_tw_recycle")
            .expect("item");
        assert!(
            recycle
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("4.12")
        );
    }
}
