//! Which namespace is a pod's, from one scan of processes. Pure.
//!
//! A pod's sandbox (pause) process is started before its containers and owns the network
//! namespace they join, so the namespace of a pod's *oldest* process is the pod's. Anything else
//! a pod's process sits in is a namespace that process made for itself (`unshare -n`, a nested
//! container runtime): it is not the pod's and is never counted as the pod's. A sandbox in the
//! agent's own namespace is a hostNetwork pod: the host counts cover it.
use std::collections::BTreeMap;

use super::cgroup::PodUid;
use super::procs::{NsId, Process};

/// The process to enter a namespace by, pinned by its start time against PID reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsRef {
    pub ns: NsId,
    pub pid: i32,
    pub start_time: u64,
}

/// One pod's own network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNs {
    pub pod: PodUid,
    pub target: NsRef,
}

/// The pods found on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMap {
    /// One entry per pod namespace, each namespace once, ordered by pod UID.
    pub pods: Vec<PodNs>,
    /// Pods whose sandbox is in the host's namespace.
    pub host_network: Vec<PodUid>,
    /// Processes of pods that sit in a namespace other than their pod's (not counted).
    pub nested_processes: usize,
    /// Pods whose sandbox namespace an older pod already owns (counted once, as that pod's).
    pub shared: Vec<PodUid>,
}

fn oldest<'a>(processes: impl Iterator<Item = &'a Process>) -> Option<&'a Process> {
    processes.min_by_key(|p| (p.start_time, p.pid))
}

fn target_of(p: &Process) -> NsRef {
    NsRef {
        ns: p.ns,
        pid: p.pid,
        start_time: p.start_time,
    }
}

/// Each pod's sandbox namespace, `host` being the agent's own.
pub fn pod_namespaces(processes: &[Process], host: NsId) -> PodMap {
    let mut by_pod: BTreeMap<&PodUid, Vec<&Process>> = BTreeMap::new();
    for p in processes {
        if let Some(uid) = &p.pod {
            by_pod.entry(uid).or_default().push(p);
        }
    }
    let mut map = PodMap::default();
    let mut sandboxes: Vec<(&Process, &PodUid)> = Vec::new();
    for (uid, procs) in &by_pod {
        let Some(sandbox) = oldest(procs.iter().copied()) else {
            continue;
        };
        map.nested_processes += procs.iter().filter(|p| p.ns != sandbox.ns).count();
        if sandbox.ns == host {
            map.host_network.push((*uid).clone());
        } else {
            sandboxes.push((sandbox, uid));
        }
    }
    // Oldest sandbox first, so a namespace two pods claim is the one of the pod that made it.
    sandboxes.sort_by_key(|(p, _)| (p.start_time, p.pid));
    let mut owned: BTreeMap<NsId, ()> = BTreeMap::new();
    for (sandbox, uid) in sandboxes {
        if owned.insert(sandbox.ns, ()).is_some() {
            map.shared.push(uid.clone());
            continue;
        }
        map.pods.push(PodNs {
            pod: uid.clone(),
            target: target_of(sandbox),
        });
    }
    map.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    map
}

/// A network namespace other than the host's, as `tcpstat --all-namespaces` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnyNs {
    pub target: NsRef,
    /// The pod whose sandbox namespace this is.
    pub pod: Option<PodUid>,
    /// Not a pod's namespace, but made by a process of this pod.
    pub inside_pod: Option<PodUid>,
    pub processes: usize,
}

/// Every namespace but the host's, each once, entered by its oldest process; ordered by inode.
pub fn all_namespaces(processes: &[Process], host: NsId) -> Vec<AnyNs> {
    let pods = pod_namespaces(processes, host);
    let mut by_ns: BTreeMap<NsId, Vec<&Process>> = BTreeMap::new();
    for p in processes.iter().filter(|p| p.ns != host) {
        by_ns.entry(p.ns).or_default().push(p);
    }
    by_ns
        .into_iter()
        .filter_map(|(ns, procs)| {
            let first = oldest(procs.iter().copied())?;
            let pod = pods
                .pods
                .iter()
                .find(|p| p.target.ns == ns)
                .map(|p| p.pod.clone());
            Some(AnyNs {
                target: target_of(first),
                inside_pod: if pod.is_none() {
                    first.pod.clone()
                } else {
                    None
                },
                pod,
                processes: procs.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: NsId = NsId { dev: 4, ino: 1 };

    fn ns(ino: u64) -> NsId {
        NsId { dev: 4, ino }
    }

    fn uid(n: u8) -> PodUid {
        PodUid::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).expect("uid")
    }

    fn proc(pid: i32, start_time: u64, ino: u64, pod: Option<u8>) -> Process {
        Process {
            pid,
            start_time,
            ns: if ino == 1 { HOST } else { ns(ino) },
            pod: pod.map(uid),
        }
    }

    #[test]
    fn containers_sharing_the_sandbox_namespace_count_once() {
        let procs = [
            proc(100, 10, 7, Some(1)), // pause
            proc(120, 12, 7, Some(1)),
            proc(130, 13, 7, Some(1)),
        ];
        let map = pod_namespaces(&procs, HOST);
        assert_eq!(map.pods.len(), 1);
        assert_eq!(map.pods[0].target.pid, 100);
        assert_eq!(map.pods[0].target.ns, ns(7));
        assert_eq!(map.nested_processes, 0);
    }

    #[test]
    fn a_namespace_made_inside_a_pod_is_not_the_pods() {
        // The container's process made its own namespace (9) and has a lower PID than the
        // pause process (PIDs wrap): the start time still picks the sandbox's namespace.
        let procs = [
            proc(50, 30, 9, Some(1)),
            proc(51, 31, 9, Some(1)),
            proc(300, 10, 7, Some(1)),
            proc(301, 11, 7, Some(1)),
        ];
        let map = pod_namespaces(&procs, HOST);
        assert_eq!(map.pods.len(), 1);
        assert_eq!(map.pods[0].target.ns, ns(7));
        assert_eq!(map.nested_processes, 2);
        let all = all_namespaces(&procs, HOST);
        assert_eq!(all.len(), 2);
        let nested = all.iter().find(|a| a.target.ns == ns(9)).expect("listed");
        assert_eq!(
            (nested.pod.clone(), nested.inside_pod.clone()),
            (None, Some(uid(1)))
        );
    }

    #[test]
    fn host_network_pods_are_the_host() {
        let procs = [proc(100, 10, 1, Some(2)), proc(101, 11, 1, Some(2))];
        let map = pod_namespaces(&procs, HOST);
        assert!(map.pods.is_empty());
        assert_eq!(map.host_network, [uid(2)]);
        assert!(all_namespaces(&procs, HOST).is_empty());
    }

    #[test]
    fn a_namespace_claimed_by_two_pods_is_counted_once_for_the_older() {
        let procs = [proc(200, 20, 7, Some(3)), proc(100, 10, 7, Some(4))];
        let map = pod_namespaces(&procs, HOST);
        assert_eq!(map.pods.len(), 1);
        assert_eq!(map.pods[0].pod, uid(4));
        assert_eq!(map.shared, [uid(3)]);
    }

    #[test]
    fn namespaces_outside_pods_are_listed_without_a_pod() {
        let procs = [
            proc(1, 1, 1, None),
            proc(500, 50, 11, None),
            proc(501, 51, 11, None),
            proc(100, 10, 7, Some(1)),
        ];
        let all = all_namespaces(&procs, HOST);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].target.ns, ns(7));
        assert_eq!(all[0].pod, Some(uid(1)));
        assert_eq!((all[1].target.pid, all[1].processes), (500, 2));
        assert_eq!(
            (all[1].pod.clone(), all[1].inside_pod.clone()),
            (None, None)
        );
        assert_eq!(pod_namespaces(&procs, HOST).pods.len(), 1);
    }
}
