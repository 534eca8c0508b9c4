//! The report's `status.pods` from one pod counting pass: sums over all pod namespaces and the
//! ten pods with the most TIME_WAIT, named from the agent's watch of its node's pods. Pure.
use std::collections::{BTreeMap, HashMap};

use crate::api::{MAX_TOP_PODS, PodTcp, PodsTcp};
use crate::podnet::{PodCounts, PodPass};
use crate::tcpstat::StateCounts;
use crate::text::bounded_list;

/// Longest `status.pods.message`.
const MAX_MESSAGE: usize = 512;

/// A pod's namespace and name, by UID.
pub type PodNames = HashMap<String, (String, String)>;

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Sockets over all states: the walk's total, or sockstat's figures before any walk.
fn total_of(p: &PodCounts) -> u64 {
    if p.walked {
        (p.states.ipv4 + p.states.ipv6).total()
    } else {
        p.sockstat.inuse.saturating_add(p.sockstat.tw)
    }
}

fn pod_tcp(p: &PodCounts, names: &PodNames) -> PodTcp {
    let uid = p.pod.as_str();
    let (namespace, name) = names.get(uid).cloned().unwrap_or_default();
    PodTcp {
        namespace,
        name,
        uid: uid.to_string(),
        time_wait: gauge(p.sockstat.tw),
        total: gauge(total_of(p)),
        states: if p.walked {
            (p.states.ipv4 + p.states.ipv6).to_map()
        } else {
            BTreeMap::new()
        },
    }
}

/// Sums and the top pods by TIME_WAIT (ties by total, then UID, so the list is stable).
pub fn summarise(pass: &PodPass, names: &PodNames) -> PodsTcp {
    let mut states = StateCounts::default();
    let (mut time_wait, mut in_use) = (0u64, 0u64);
    for p in &pass.pods {
        states = states + p.states.ipv4 + p.states.ipv6;
        time_wait = time_wait.saturating_add(p.sockstat.tw);
        in_use = in_use.saturating_add(p.sockstat.inuse);
    }
    let mut ranked: Vec<&PodCounts> = pass.pods.iter().collect();
    ranked.sort_by(|a, b| {
        (b.sockstat.tw, total_of(b))
            .cmp(&(a.sockstat.tw, total_of(a)))
            .then_with(|| a.pod.cmp(&b.pod))
    });
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    PodsTcp {
        namespaces: count(pass.pods.len()),
        time_wait: gauge(time_wait),
        in_use: gauge(in_use),
        states: states.to_map(),
        top: ranked
            .into_iter()
            .take(MAX_TOP_PODS)
            .map(|p| pod_tcp(p, names))
            .collect(),
        host_network_pods: count(pass.host_network),
        skipped: count(pass.failures),
        truncated: pass.truncated,
        message: (!pass.errors.is_empty()).then(|| bounded_list(&pass.errors, MAX_MESSAGE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podnet::{NsId, NsSockstat, PodUid};
    use crate::tcpstat::TcpState;
    use crate::tcpstat::netlink::FamilyCounts;

    fn pod(n: u32, tw: u64, established: u64) -> PodCounts {
        let mut ipv4 = StateCounts::default();
        ipv4.set(TcpState::TimeWait, tw);
        ipv4.set(TcpState::Established, established);
        PodCounts {
            pod: PodUid::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).expect("uid"),
            ns: NsId {
                dev: 4,
                ino: n.into(),
            },
            states: FamilyCounts {
                ipv4,
                ipv6: StateCounts::default(),
            },
            walked: true,
            sockstat: NsSockstat {
                inuse: established,
                tw,
            },
        }
    }

    #[test]
    fn top_ten_by_time_wait_then_total_with_names_and_sums() {
        let mut pass = PodPass {
            walked: true,
            host_network: 2,
            ..PodPass::default()
        };
        pass.pods = (1..=12).map(|n| pod(n, u64::from(n) * 10, 1)).collect();
        // A tie on TIME_WAIT with pod 12: more sockets ranks first.
        pass.pods.push(pod(13, 120, 50));
        let mut names = PodNames::new();
        names.insert(
            pass.pods[12].pod.to_string(),
            ("web".into(), "squid-0".into()),
        );
        let s = summarise(&pass, &names);
        assert_eq!(s.namespaces, 13);
        assert_eq!(s.top.len(), MAX_TOP_PODS);
        assert_eq!(
            (
                s.top[0].namespace.as_str(),
                s.top[0].name.as_str(),
                s.top[0].time_wait
            ),
            ("web", "squid-0", 120)
        );
        assert_eq!(s.top[0].states["ESTABLISHED"], 50);
        assert_eq!(s.top[1].time_wait, 120);
        assert_eq!(s.top[1].name, "", "unknown to the watch: UID only");
        assert_eq!(s.top[9].time_wait, 40);
        let tw: i64 = (1..=12).map(|n| n * 10).sum::<i64>() + 120;
        assert_eq!((s.time_wait, s.states["TIME_WAIT"]), (tw, tw));
        assert_eq!(s.host_network_pods, 2);
        assert!(s.message.is_none());
    }

    #[test]
    fn failures_are_counted_and_their_messages_bounded() {
        let pass = PodPass {
            failures: 40,
            errors: vec!["pod x: process 7 has exited".repeat(40); 5],
            truncated: true,
            ..PodPass::default()
        };
        let s = summarise(&pass, &PodNames::new());
        assert_eq!((s.skipped, s.truncated), (40, true));
        let message = s.message.expect("message");
        assert!(message.len() <= MAX_MESSAGE + 64, "{}", message.len());
    }
}
