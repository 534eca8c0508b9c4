//! The agent's schedule for pods: the cheap tier (sockstat per namespace: TIME_WAIT and in-use
//! sockets, no walk) on every pass, the full per-state walk once per `walk_every` (the report
//! heartbeat). Per-state counts between walks are the last walk's, kept only for namespaces seen
//! in that walk, so pods that are gone leave nothing behind.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cgroup::PodUid;
use super::count::{self, Limits, NsSockstat, Pass};
use super::error::PodNetError;
use super::procs::NsId;
use super::sandbox::{PodMap, PodNs};
use crate::tcpstat::netlink::FamilyCounts;

/// Error messages kept per pass (the rest are counted).
const MAX_ERRORS: usize = 5;

/// One pod's counts this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCounts {
    pub pod: PodUid,
    pub ns: NsId,
    /// Per state, from the last walk (zeros until a walk has seen the namespace).
    pub states: FamilyCounts,
    /// Whether `states` comes from a walk at all.
    pub walked: bool,
    /// Fresh this pass.
    pub sockstat: NsSockstat,
}

/// Every pod namespace's counts this pass, and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPass {
    pub pods: Vec<PodCounts>,
    /// This pass walked (per-state counts are fresh).
    pub walked: bool,
    pub host_network: usize,
    pub nested_processes: usize,
    /// Namespaces that could not be counted (pod gone, PID reused, ...).
    pub failures: usize,
    /// The first few failures, as messages.
    pub errors: Vec<String>,
    /// The pass stopped at its time or namespace bound; some pods are missing.
    pub truncated: bool,
}

pub struct PodCounter {
    proc_root: PathBuf,
    limits: Limits,
    walk_every: Duration,
    last_walk: Option<Instant>,
    states: HashMap<(PodUid, NsId), FamilyCounts>,
    /// After a walk its bounds cut short, the last pod it reached: the next walk starts after
    /// it, so on a node too big for one pass every pod is walked in turn.
    resume_after: Option<PodUid>,
}

/// Puts the pods after `after` (by UID; `pods` is sorted by UID) first, the rest behind.
pub fn rotate(pods: &mut [PodNs], after: Option<&PodUid>) {
    if let Some(after) = after {
        let start = pods.iter().position(|p| &p.pod > after).unwrap_or(0);
        pods.rotate_left(start);
    }
}

impl PodCounter {
    pub fn new(proc_root: PathBuf, limits: Limits, walk_every: Duration) -> Self {
        Self {
            proc_root,
            limits,
            walk_every,
            last_walk: None,
            states: HashMap::new(),
            resume_after: None,
        }
    }

    /// Discovers the pods and counts them in the tier due.
    pub fn count(&mut self) -> Result<PodPass, PodNetError> {
        let deadline = Instant::now() + self.limits.budget;
        let (mut map, scan_truncated) = super::discover(&self.proc_root, &self.limits, deadline)?;
        let walk = self
            .last_walk
            .is_none_or(|at| at.elapsed() >= self.walk_every);
        if walk {
            rotate(&mut map.pods, self.resume_after.as_ref());
        }
        let targets: Vec<_> = map.pods.iter().map(|p| p.target).collect();
        let mut pass = if walk {
            let walked = count::walk_all(&self.proc_root, &targets, &self.limits, deadline)?;
            self.last_walk = Some(Instant::now());
            self.resume_after = walked
                .truncated
                .then(|| walked.results.len().checked_sub(1))
                .flatten()
                .and_then(|last| map.pods.get(last))
                .map(|p| p.pod.clone());
            let pass = from_walk(&map, walked);
            // Pods gone are forgotten; pods this walk did not reach keep their last counts.
            let present: HashSet<(PodUid, NsId)> = map
                .pods
                .iter()
                .map(|p| (p.pod.clone(), p.target.ns))
                .collect();
            self.states.retain(|k, _| present.contains(k));
            self.states
                .extend(pass.pods.iter().map(|p| ((p.pod.clone(), p.ns), p.states)));
            pass
        } else {
            let cheap = count::sockstat_all(&self.proc_root, &targets, &self.limits, deadline);
            from_sockstat(&map, cheap, &self.states)
        };
        pass.truncated |= scan_truncated;
        Ok(pass)
    }
}

fn base(map: &PodMap, walked: bool, truncated: bool) -> PodPass {
    PodPass {
        walked,
        host_network: map.host_network.len(),
        nested_processes: map.nested_processes,
        truncated,
        ..PodPass::default()
    }
}

fn note_failure(pass: &mut PodPass, pod: &PodUid, e: &PodNetError) {
    pass.failures += 1;
    if pass.errors.len() < MAX_ERRORS {
        pass.errors.push(format!("pod {pod}: {e}"));
    }
}

/// Results come in the order of `map.pods`, possibly cut short: zip pairs them up.
fn from_walk(map: &PodMap, walked: Pass<count::Walked>) -> PodPass {
    let mut pass = base(map, true, walked.truncated);
    for (pod, (target, result)) in map.pods.iter().zip(walked.results) {
        match result {
            Ok(w) => pass.pods.push(PodCounts {
                pod: pod.pod.clone(),
                ns: target.ns,
                states: w.counts,
                walked: true,
                sockstat: w.sockstat,
            }),
            Err(e) => note_failure(&mut pass, &pod.pod, &e),
        }
    }
    pass
}

fn from_sockstat(
    map: &PodMap,
    cheap: Pass<NsSockstat>,
    states: &HashMap<(PodUid, NsId), FamilyCounts>,
) -> PodPass {
    let mut pass = base(map, false, cheap.truncated);
    for (pod, (target, result)) in map.pods.iter().zip(cheap.results) {
        match result {
            Ok(sockstat) => {
                let last = states.get(&(pod.pod.clone(), target.ns));
                pass.pods.push(PodCounts {
                    pod: pod.pod.clone(),
                    ns: target.ns,
                    states: last.copied().unwrap_or_default(),
                    walked: last.is_some(),
                    sockstat,
                });
            }
            Err(e) => note_failure(&mut pass, &pod.pod, &e),
        }
    }
    pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podnet::sandbox::NsRef;

    fn pods(n: u8) -> Vec<PodNs> {
        (1..=n)
            .map(|i| PodNs {
                pod: PodUid::parse(&format!("{i:08x}-0000-4000-8000-000000000000")).expect("uid"),
                target: NsRef {
                    ns: NsId {
                        dev: 4,
                        ino: i.into(),
                    },
                    pid: i.into(),
                    start_time: 1,
                },
            })
            .collect()
    }

    #[test]
    fn a_cut_short_walk_resumes_after_the_last_pod_reached() {
        let mut all = pods(5);
        let third = all[2].pod.clone();
        rotate(&mut all, Some(&third));
        let order: Vec<u64> = all.iter().map(|p| p.target.ns.ino).collect();
        assert_eq!(order, [4, 5, 1, 2, 3]);
        // The last pod reached was the last one, or is gone: start from the first again.
        let mut all = pods(5);
        let last = all[4].pod.clone();
        rotate(&mut all, Some(&last));
        assert_eq!(all[0].target.ns.ino, 1);
        let mut all = pods(3);
        rotate(&mut all, None);
        assert_eq!(all[0].target.ns.ino, 1);
    }
}
