//! Per-key results across pods, bounded, for the node's report; and how the host path reports
//! pod-targeting profiles it does not apply.
use std::collections::BTreeMap;

use super::selection::PodPlan;
use crate::api::report::{MAX_NAMED_PODS, MAX_POD_SYSCTLS};
use crate::api::{KeyState, NodeTuningProfile, PodKeyOutcome, PodSysctlEntry, SysctlEntry};
use crate::sysctl::{KeyResult, SysctlKey};

/// Why the host path leaves a pod-targeting profile alone, while no agent tunes pods' namespaces.
pub const NOT_HANDLED_YET: &str = "pod-targeting profile (spec.podSelector or \
     spec.namespaceSelector): its keys are set only inside the selected pods' network \
     namespaces, never in the host's, and this agent does not tune pods' namespaces yet";

/// Why, when pod targeting is turned off for the cluster.
pub const TURNED_OFF: &str = "pod-targeting profile: pod targeting is turned off on this \
     cluster (chart value agent.podTargeting.enabled, agent flag --pod-targeting): its keys \
     are applied nowhere, and never to the host instead";

/// One entry per key of every pod-targeting profile in `matched`: the host report says the
/// profile is not applied rather than leaving its keys out silently. A key no pod could take
/// is judged as pod planning judges it (malformed: `Invalid`; not `NetworkNamespace`-scoped or
/// on the built-in denylist: `Denied`, with the reason); every other key is `Unsupported`,
/// stating `why` (e.g. [`NOT_HANDLED_YET`]).
pub fn not_handled(matched: &[&NodeTuningProfile], why: &str) -> Vec<SysctlEntry> {
    matched
        .iter()
        .filter(|p| p.spec.targets_pods())
        .flat_map(|p| {
            p.spec
                .sysctls
                .iter()
                .map(|(raw, value)| not_handled_key(p, raw, value, why))
        })
        .collect()
}

fn not_handled_key(p: &NodeTuningProfile, raw: &str, value: &str, why: &str) -> SysctlEntry {
    let parsed = crate::sysctl::key::parse_spec(raw);
    let (state, message) = match &parsed {
        Err(e) => (KeyState::Invalid, e.to_string()),
        Ok((k, _)) => super::selection::refusal(k, value, &crate::sysctl::Policy::default())
            .unwrap_or_else(|| (KeyState::Unsupported, why.to_string())),
    };
    let parsed = parsed.ok();
    SysctlEntry {
        key: parsed
            .as_ref()
            .map_or_else(|| raw.to_string(), |(k, _)| k.dotted()),
        desired: Some(value.to_string()),
        actual: None,
        original: None,
        profile: p.metadata.name.clone(),
        scope: parsed
            .as_ref()
            .map_or(crate::api::Scope::Node, |(k, _)| k.scope()),
        optional: parsed.as_ref().is_some_and(|(_, optional)| *optional),
        state,
        message: Some(message),
    }
}

/// The tally of one (key, profile) across pods.
#[derive(Default)]
struct Tally {
    desired: String,
    pods: i32,
    applied: i32,
    conflicts: i32,
    failed: i32,
    named: Vec<PodKeyOutcome>,
}

impl Tally {
    fn name(&mut self, plan: &PodPlan, state: KeyState, message: String) {
        self.named.push(PodKeyOutcome {
            namespace: plan.pod.namespace.clone(),
            name: plan.pod.name.clone(),
            state,
            message,
        });
    }
}

type Tallies = BTreeMap<(String, String), Tally>;

/// The tally of `key` set by `profile`, with one more pod counted.
fn tally<'t>(tallies: &'t mut Tallies, key: &str, profile: &str, desired: &str) -> &'t mut Tally {
    let t = tallies
        .entry((key.to_string(), profile.to_string()))
        .or_default();
    t.desired = desired.to_string();
    t.pods += 1;
    t
}

/// Summarise, per key and profile, how the planned pods stand. `results` maps a pod uid to what
/// [`crate::plan::execute`] returned in that pod's namespace; a planned pod without results
/// (its namespace not found yet) counts in `pods` only. At most [`MAX_POD_SYSCTLS`] entries,
/// each naming at most [`MAX_NAMED_PODS`] pods (namespace/name order); the counts cover all.
pub fn summarise(
    plans: &[PodPlan],
    results: &BTreeMap<String, Vec<KeyResult>>,
) -> Vec<PodSysctlEntry> {
    let mut tallies: Tallies = BTreeMap::new();
    for plan in plans {
        let got = results.get(&plan.pod.uid);
        for (key, d) in &plan.merged.desired {
            let t = tally(&mut tallies, key, &d.profile, &d.value);
            match got.and_then(|rs| rs.iter().find(|r| &r.key == key)) {
                Some(r) if matches!(r.state, KeyState::Applied | KeyState::DryRun) => {
                    t.applied += 1
                }
                Some(r) if r.is_failure() => {
                    t.failed += 1;
                    let why = r
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("{:?}", r.state));
                    t.name(plan, r.state, why);
                }
                // Not reached yet, or an optional key the kernel lacks.
                _ => {}
            }
        }
        for r in &plan.refused {
            let key = SysctlKey::parse(&r.key).map_or_else(|_| r.key.clone(), |k| k.dotted());
            let t = tally(&mut tallies, &key, &r.profile, &r.value);
            t.failed += 1;
            t.name(plan, r.state, r.message.clone());
        }
        for o in &plan.pod_owned {
            let t = tally(&mut tallies, &o.key, &o.profile, &o.desired);
            if o.agrees() {
                t.applied += 1;
            } else {
                t.conflicts += 1;
                t.name(plan, KeyState::Overridden, o.message(&plan.pod));
            }
        }
    }
    tallies
        .into_iter()
        .take(MAX_POD_SYSCTLS)
        .map(|((key, profile), mut t)| {
            t.named
                .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            t.named.truncate(MAX_NAMED_PODS);
            PodSysctlEntry {
                key,
                profile,
                desired: t.desired,
                pods: t.pods,
                applied: t.applied,
                conflicts: t.conflicts,
                failed: t.failed,
                named: t.named,
            }
        })
        .collect()
}
