//! The agent's schedule for pods: the cheap tier (sockstat per namespace: TIME_WAIT and in-use
//! sockets, no walk) on every pass, the full per-state walk once per `walk_every` (the report
//! heartbeat). Per-state counts between walks are the last walk's, kept only for namespaces seen
//! in that walk, so pods that are gone leave nothing behind.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cgroup::PodUid;
use super::count::{self, Limits, NsSockstat, Pass};
use super::error::PodNetError;
use super::procs::NsId;
use super::sandbox::PodMap;
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
}

impl PodCounter {
    pub fn new(proc_root: PathBuf, limits: Limits, walk_every: Duration) -> Self {
        Self {
            proc_root,
            limits,
            walk_every,
            last_walk: None,
            states: HashMap::new(),
        }
    }

    /// Discovers the pods and counts them in the tier due.
    pub fn count(&mut self) -> Result<PodPass, PodNetError> {
        let deadline = Instant::now() + self.limits.budget;
        let (map, scan_truncated) = super::discover(&self.proc_root, &self.limits, deadline)?;
        let targets: Vec<_> = map.pods.iter().map(|p| p.target).collect();
        let walk = self
            .last_walk
            .is_none_or(|at| at.elapsed() >= self.walk_every);
        let mut pass = if walk {
            let walked = count::walk_all(&self.proc_root, &targets, &self.limits, deadline)?;
            self.last_walk = Some(Instant::now());
            let pass = from_walk(&map, walked);
            self.states = pass
                .pods
                .iter()
                .map(|p| ((p.pod.clone(), p.ns), p.states))
                .collect();
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
