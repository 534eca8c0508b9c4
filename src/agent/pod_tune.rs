//! The agent's pod-tuning pass: for every pod a pod-targeting profile selects on this node,
//! the profile's keys set inside the pod's own network namespace, read back and verified;
//! originals recorded per pod namespace in the ledger before the kernel is written; put back
//! when no profile wants them on a living pod; dropped when the namespace is gone.
//!
//! Per pass, at most two entries into each namespace that needs work, always through
//! [`podnet::inside_each`] (pidfd-pinned, start-time and inode checked, on a thread that does
//! nothing else): one to read, then, once the ledger holds the originals, one to write and
//! read back. A pod whose keys already hold their values is entered once. The pass is bounded
//! by the pod budget and namespace bound: the host's keys are tuned before it starts and never
//! wait for it.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::api::{NodeTuningProfile, PodSysctlEntry};
use crate::podnet::{self, Limits, NsRef, PodNetError};
use crate::podtune::apply::{self as steps, Failure, Reads, Set, SetOutcome};
use crate::podtune::{HeldPodKey, NodePodPlan, PodNetns, RestoreDecision};
use crate::sysctl::ledger::PodNsKey;
use crate::sysctl::{KeyResult, Ledger, Policy, SysctlFs, SysctlIoError, SysctlKey};

/// Most warnings a pass keeps (the rest are counted in the summary).
const MAX_WARNINGS: usize = 5;

/// What one pod pass did.
#[derive(Debug, Default)]
pub struct PodTuneOutcome {
    /// Per key and profile across pods, for `status.podSysctls`.
    pub entries: Vec<PodSysctlEntry>,
    /// Each key's result per pod uid (this pass's).
    pub results: BTreeMap<String, Vec<KeyResult>>,
    /// Originals put back in living pods, with the pod uid.
    pub restored: Vec<(String, KeyResult)>,
    /// Ledger entries dropped because their namespace is gone.
    pub dropped: usize,
    pub warnings: Vec<String>,
}

impl PodTuneOutcome {
    fn warn(&mut self, w: String) {
        tracing::warn!("{w}");
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        }
    }
}

/// The facts one pod pass needs from the agent.
pub struct PodPassInput<'a> {
    pub plan: &'a NodePodPlan,
    /// Uids of every pod the agent's watch holds on this node: a namespace whose pod the watch
    /// does not know yet is never restored (its labels are unknown), only tuned once known.
    pub known: &'a BTreeSet<String>,
    pub all_profiles: &'a [&'a NodeTuningProfile],
    pub policy: &'a Policy,
}

pub struct PodTuner {
    proc_root: PathBuf,
    limits: Limits,
    /// After a read pass its bounds cut short, the uid of the last pod it reached: the next
    /// pass starts after it, so on a node too big for one pass every pod gets its turn.
    resume_after: Option<String>,
}

/// Puts the jobs of uids after `after` first (`jobs` sorted by uid), the rest behind.
pub fn rotate_after<T>(jobs: &mut [(String, T)], after: Option<&str>) {
    if let Some(after) = after {
        let start = jobs
            .iter()
            .position(|(uid, _)| uid.as_str() > after)
            .unwrap_or(0);
        jobs.rotate_left(start);
    }
}

/// One namespace found this pass.
type Found = BTreeMap<String, NsRef>;

impl PodTuner {
    pub fn new(proc_root: PathBuf, limits: Limits) -> Self {
        Self {
            proc_root,
            limits,
            resume_after: None,
        }
    }

    /// One bounded pass over the node's pods (see the module docs).
    pub fn pass(&mut self, ledger: &mut Ledger, input: &PodPassInput<'_>) -> PodTuneOutcome {
        let deadline = Instant::now() + self.limits.budget;
        let mut out = PodTuneOutcome::default();
        let (found, complete) = match podnet::discover(&self.proc_root, &self.limits, deadline) {
            Ok((map, truncated)) => {
                let found: Found = map
                    .pods
                    .iter()
                    .map(|p| (p.pod.as_str().to_owned(), p.target))
                    .collect();
                (found, !truncated)
            }
            Err(e) => {
                out.warn(format!("finding pods' network namespaces failed: {e}"));
                out.entries = crate::podtune::summarise(&input.plan.pods, &out.results);
                return out;
            }
        };
        let mut sets = self.apply_steps(ledger, input, &found, deadline, &mut out);
        self.restore_steps(ledger, input, &found, complete, &mut sets, &mut out);
        self.write_steps(ledger, &found, sets, deadline, &mut out);
        out.entries = crate::podtune::summarise(&input.plan.pods, &out.results);
        out
    }

    /// Reads every planned pod's keys inside its namespace, records the originals of those to
    /// change, and returns the writes due per pod uid.
    fn apply_steps(
        &mut self,
        ledger: &mut Ledger,
        input: &PodPassInput<'_>,
        found: &Found,
        deadline: Instant,
        out: &mut PodTuneOutcome,
    ) -> BTreeMap<String, Vec<Set>> {
        let mut by_uid: Vec<(String, (NsRef, Vec<SysctlKey>))> = input
            .plan
            .pods
            .iter()
            .filter_map(|p| {
                let keys = p.merged.desired.values().map(|d| d.key.clone()).collect();
                Some((p.pod.uid.clone(), (*found.get(&p.pod.uid)?, keys)))
            })
            .collect();
        by_uid.sort_by(|a, b| a.0.cmp(&b.0));
        rotate_after(&mut by_uid, self.resume_after.as_deref());
        let jobs: Vec<(NsRef, Vec<SysctlKey>)> = by_uid.iter().map(|(_, j)| j.clone()).collect();
        let (reads, cut_after) = self.inside(&jobs, deadline, read_keys, out);
        self.resume_after = cut_after
            .and_then(|n| n.checked_sub(1))
            .and_then(|last| by_uid.get(last))
            .map(|(uid, _)| uid.clone());
        let mut sets = BTreeMap::new();
        let mut record = Vec::new();
        for plan in &input.plan.pods {
            let Some(target) = found.get(&plan.pod.uid) else {
                continue;
            };
            let Some(reads) = reads.get(&(target.pid, target.ns.ino)) else {
                continue;
            };
            let inode = target.ns.ino;
            let d = steps::decide(plan, reads, inode, |k| {
                ledger
                    .pod_entry(&plan.pod.uid, inode, k)
                    .map(|e| e.original.clone())
            });
            out.results.insert(plan.pod.uid.clone(), d.done);
            record.extend(d.record);
            if !d.sets.is_empty() {
                sets.insert(plan.pod.uid.clone(), d.sets);
            }
        }
        if let Err(e) = ledger.record_pod_originals(record) {
            // Crash safety first: no original, no write.
            let why = format!("kernel not touched: could not record the original value: {e}");
            for (uid, pod_sets) in std::mem::take(&mut sets) {
                let results = out.results.entry(uid).or_default();
                results.extend(pod_sets.iter().filter(|s| !s.restore).map(|s| {
                    let mut r = steps::result(&s.key, &s.value, crate::api::KeyState::Failed);
                    r.message = Some(why.clone());
                    r
                }));
            }
        }
        sets
    }

    /// Adds the restores due in living pods to `sets`, and forgets or drops what must go.
    fn restore_steps(
        &self,
        ledger: &mut Ledger,
        input: &PodPassInput<'_>,
        found: &Found,
        complete: bool,
        sets: &mut BTreeMap<String, Vec<Set>>,
        out: &mut PodTuneOutcome,
    ) {
        let held: Vec<HeldPodKey> = ledger
            .pod_entries()
            .map(|e| HeldPodKey {
                netns: PodNetns {
                    uid: e.pod_uid.clone(),
                    inode: e.netns_inode,
                },
                key: e.key.dotted(),
                profile: e.profile.clone(),
            })
            .collect();
        let living: BTreeMap<String, u64> = found
            .iter()
            .map(|(uid, t)| (uid.clone(), t.ns.ino))
            .collect();
        let decisions =
            crate::podtune::restore_decisions(&held, &living, &input.plan.pods, input.all_profiles);
        let mut forget: Vec<PodNsKey> = Vec::new();
        for (h, decision) in decisions {
            let Ok(key) = SysctlKey::parse(&h.key) else {
                continue;
            };
            let id = (h.netns.uid.clone(), h.netns.inode, key);
            match decision {
                // A namespace missing from a cut-short scan may still live: keep its entries.
                RestoreDecision::Drop if !complete && !living.contains_key(&h.netns.uid) => {}
                RestoreDecision::Drop | RestoreDecision::Forget => forget.push(id),
                // Unknown to the watch yet: its labels may still select it.
                RestoreDecision::Restore if !input.known.contains(&h.netns.uid) => {}
                RestoreDecision::Restore => {
                    let Some(entry) = ledger.pod_entry(&id.0, id.1, &id.2) else {
                        continue;
                    };
                    match steps::restore_set(entry, input.policy) {
                        Ok(set) => sets.entry(id.0).or_default().push(set),
                        Err(r) => out.restored.push((id.0, *r)),
                    }
                }
            }
        }
        match ledger.remove_pod_entries(&forget) {
            Ok(removed) => out.dropped = removed.len(),
            Err(e) => out.warn(format!("dropping pod ledger entries failed: {e}")),
        }
    }

    /// Writes every due [`Set`] inside its pod's namespace, reads back, and takes restored
    /// originals out of the ledger.
    fn write_steps(
        &self,
        ledger: &mut Ledger,
        found: &Found,
        sets: BTreeMap<String, Vec<Set>>,
        deadline: Instant,
        out: &mut PodTuneOutcome,
    ) {
        let jobs: Vec<(NsRef, Vec<Set>)> = sets
            .iter()
            .filter_map(|(uid, s)| Some((*found.get(uid)?, s.clone())))
            .collect();
        let (done, _) = self.inside(&jobs, deadline, write_keys, out);
        let mut restored_ids = Vec::new();
        for (uid, pod_sets) in &sets {
            let Some(outcomes) = found.get(uid).and_then(|t| done.get(&(t.pid, t.ns.ino))) else {
                continue;
            };
            for (set, o) in pod_sets.iter().zip(outcomes) {
                let r = steps::outcome(set, o);
                if set.restore {
                    if r.state == crate::api::KeyState::Restored {
                        let inode = found.get(uid).map_or(0, |t| t.ns.ino);
                        restored_ids.push((uid.clone(), inode, set.key.clone()));
                    }
                    out.restored.push((uid.clone(), r));
                } else {
                    out.results.entry(uid.clone()).or_default().push(r);
                }
            }
        }
        if let Err(e) = ledger.remove_pod_entries(&restored_ids) {
            out.warn(format!(
                "restored originals stay in the ledger ({e}); the next pass finds them in place"
            ));
        }
    }

    /// Runs `work` with each job inside its namespace; the results by (pid, inode), and when the
    /// bounds cut the pass short, how many jobs it reached. A namespace that could not be
    /// entered is a warning (its pod is gone, restarting or racing).
    fn inside<J, T>(
        &self,
        jobs: &[(NsRef, J)],
        deadline: Instant,
        work: fn(&SysctlFs, &J) -> T,
        out: &mut PodTuneOutcome,
    ) -> (HashMap<(i32, u64), T>, Option<usize>)
    where
        J: Clone + Send + Sync + 'static,
        T: Send + 'static,
    {
        if jobs.is_empty() {
            return (HashMap::new(), None);
        }
        let targets: Vec<NsRef> = jobs.iter().map(|(t, _)| *t).collect();
        let by_id: Arc<HashMap<(i32, u64), J>> = Arc::new(
            jobs.iter()
                .map(|(t, j)| ((t.pid, t.ns.ino), j.clone()))
                .collect(),
        );
        let each = move |proc_root: &Path, t: &NsRef| -> Result<T, PodNetError> {
            let job = by_id
                .get(&(t.pid, t.ns.ino))
                .ok_or(PodNetError::Gone { pid: t.pid })?;
            // Opened from this thread, /proc/sys/net is the namespace just entered.
            Ok(work(&SysctlFs::new(proc_root.join("sys")), job))
        };
        let pass = match podnet::count::inside_each(
            &self.proc_root,
            &targets,
            &self.limits,
            deadline,
            each,
        ) {
            Ok(p) => p,
            Err(e) => {
                out.warn(format!("entering pods' network namespaces failed: {e}"));
                return (HashMap::new(), None);
            }
        };
        let cut_after = pass.truncated.then_some(pass.results.len());
        if pass.truncated {
            out.warn("the pod pass reached its time or namespace bound; the rest waits for the next pass".into());
        }
        let mut got = HashMap::new();
        for (t, r) in pass.results {
            match r {
                Ok(v) => {
                    got.insert((t.pid, t.ns.ino), v);
                }
                Err(e) => out.warn(format!("pod namespace {}: {e}", t.ns.ino)),
            }
        }
        (got, cut_after)
    }
}

fn failure(e: &SysctlIoError, key: &SysctlKey) -> Failure {
    let why = match e {
        SysctlIoError::NotFound { .. } => crate::sysctl::apply::unsupported_message(key),
        other => other.to_string(),
    };
    (e.state(), why)
}

/// Inside a namespace: the current value of each key. (`&Vec`: the job type of [`PodTuner::inside`].)
#[allow(clippy::ptr_arg)]
fn read_keys(fs: &SysctlFs, keys: &Vec<SysctlKey>) -> Reads {
    keys.iter()
        .map(|k| (k.dotted(), fs.read(k).map_err(|e| failure(&e, k))))
        .collect()
}

/// Inside a namespace: each write, skipped when the value is already there, then read back.
#[allow(clippy::ptr_arg)]
fn write_keys(fs: &SysctlFs, sets: &Vec<Set>) -> Vec<SetOutcome> {
    sets.iter()
        .map(|s| {
            let previous = fs.read(&s.key).map_err(|e| failure(&e, &s.key));
            if previous
                .as_ref()
                .is_ok_and(|v| crate::sysctl::value::same(v, &s.value))
                || previous.is_err()
            {
                return SetOutcome {
                    previous,
                    write: None,
                    actual: None,
                };
            }
            let write = fs.write(&s.key, &s.value).map_err(|e| failure(&e, &s.key));
            let actual = Some(fs.read(&s.key).map_err(|e| failure(&e, &s.key)));
            SetOutcome {
                previous,
                write: Some(write),
                actual,
            }
        })
        .collect()
}

/// The pod tuner of the agent's flags: `/proc` of the host (hostPID), the pod counting bounds.
pub fn tuner(args: &super::AgentArgs) -> PodTuner {
    PodTuner::new(
        PathBuf::from("/proc"),
        Limits {
            max_namespaces: args.pod_max_namespaces,
            budget: args.pod_budget,
            ..Limits::default()
        },
    )
}

/// The cluster policy for a pod pass: built-in rules without a file; a file that cannot be
/// used refuses every write and restore (fail closed) and says why.
pub fn policy(file: Option<&Path>, warnings: &mut Vec<String>) -> Policy {
    let Some(path) = file else {
        return Policy::default();
    };
    Policy::from_file(path).unwrap_or_else(|e| {
        warnings.push(format!(
            "cluster sysctl policy unusable, nothing is written or restored in pods until it is \
             fixed: {e}"
        ));
        Policy::refuse_all(e.to_string())
    })
}

/// [`PodTuner::pass`], unless no pod is planned and the ledger holds nothing of pods: then
/// there is nothing to do and `/proc` is not even scanned.
pub fn pass_if_needed(
    tuner: &mut PodTuner,
    ledger: &mut Ledger,
    plan: &NodePodPlan,
    known: &BTreeSet<String>,
    all_profiles: &[&NodeTuningProfile],
    policy: &Policy,
) -> PodTuneOutcome {
    if plan.pods.is_empty() && ledger.pod_entries().next().is_none() {
        return PodTuneOutcome::default();
    }
    tuner.pass(
        ledger,
        &PodPassInput {
            plan,
            known,
            all_profiles,
            policy,
        },
    )
}

/// The ledger cannot be trusted: nothing is written in any pod; every planned key says why.
pub fn refused(plan: &NodePodPlan, why: String) -> PodTuneOutcome {
    let mut out = PodTuneOutcome::default();
    for p in &plan.pods {
        let results = p
            .merged
            .desired
            .values()
            .map(|d| {
                let mut r = steps::result(&d.key, &d.value, crate::api::KeyState::Failed);
                r.message = Some(format!("kernel not touched: {why}"));
                r
            })
            .collect();
        out.results.insert(p.pod.uid.clone(), results);
    }
    out.entries = crate::podtune::summarise(&plan.pods, &out.results);
    out.warn(format!("pods' namespaces are not tuned: {why}"));
    out
}

/// Puts a pod pass into the report: `podSysctls`, its warnings, and, for the host entries that
/// name pod-targeting profiles, either nothing (pods are tuned: `podSysctls` says how) or why
/// they are applied nowhere (pod targeting turned off).
pub fn fill_status(
    status: &mut crate::api::NodeTuningReportStatus,
    outcome: Option<&PodTuneOutcome>,
    targeting: bool,
) {
    use crate::podtune::summary::{NOT_HANDLED_YET, TURNED_OFF};
    if targeting {
        status
            .sysctls
            .retain(|e| e.message.as_deref() != Some(NOT_HANDLED_YET));
    } else {
        for e in &mut status.sysctls {
            if e.message.as_deref() == Some(NOT_HANDLED_YET) {
                e.message = Some(TURNED_OFF.to_string());
            }
        }
    }
    let Some(out) = outcome else {
        return;
    };
    status.pod_sysctls = out.entries.clone();
    status.warnings.extend(out.warnings.iter().cloned());
    status.warnings.extend(
        out.restored
            .iter()
            .filter(|(_, r)| r.is_failure())
            .map(|(uid, r)| {
                format!(
                    "pod {uid}: restoring {} failed: {}",
                    r.key,
                    r.message.as_deref().unwrap_or_default()
                )
            }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyState, NodeTuningReportStatus, SysctlEntry};
    use crate::podtune::summary::{NOT_HANDLED_YET, TURNED_OFF};

    fn status_with_a_pod_key() -> NodeTuningReportStatus {
        NodeTuningReportStatus {
            sysctls: vec![SysctlEntry {
                key: "net.ipv4.tcp_fin_timeout".into(),
                desired: Some("17".into()),
                actual: None,
                original: None,
                profile: Some("squid".into()),
                scope: crate::api::Scope::NetworkNamespace,
                optional: false,
                state: KeyState::Unsupported,
                message: Some(NOT_HANDLED_YET.into()),
            }],
            ..Default::default()
        }
    }

    /// Pods tuned: the host report no longer says a pod profile is not handled (podSysctls
    /// says how it went); pod targeting off: it says why the keys are applied nowhere.
    #[test]
    fn the_host_entries_of_pod_profiles_follow_the_switch() {
        let mut on = status_with_a_pod_key();
        let outcome = PodTuneOutcome {
            warnings: vec!["pod namespace 7: process 9 has exited".into()],
            ..Default::default()
        };
        fill_status(&mut on, Some(&outcome), true);
        assert!(on.sysctls.is_empty(), "{:?}", on.sysctls);
        assert_eq!(on.warnings, outcome.warnings);
        let mut off = status_with_a_pod_key();
        fill_status(&mut off, None, false);
        assert_eq!(off.sysctls[0].message.as_deref(), Some(TURNED_OFF));
        assert_eq!(off.sysctls[0].state, KeyState::Unsupported);
    }

    #[test]
    fn a_cut_short_pass_resumes_after_the_last_pod_reached() {
        let jobs = || -> Vec<(String, u8)> { (1..=5).map(|n| (format!("uid-{n}"), n)).collect() };
        let mut j = jobs();
        rotate_after(&mut j, Some("uid-3"));
        assert_eq!(
            j.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [4, 5, 1, 2, 3]
        );
        let mut j = jobs();
        rotate_after(&mut j, Some("uid-5"));
        assert_eq!(
            j[0].1, 1,
            "the last pod reached was the last: from the start again"
        );
        let mut j = jobs();
        rotate_after(&mut j, None);
        assert_eq!(j[0].1, 1);
    }
}
