//! Kernel tests for pod namespace discovery and counting: "pods" made of `unshare -n`
//! processes holding sockets in known states, placed in cgroups named as the kubelet names
//! them (cgroupfs and systemd forms), counted by `podnet` from this test's namespace and
//! checked against `nsenter -t PID -n ss -tan` in each. One "pod" also holds a process that made
//! a namespace of its own, which must not be taken for the pod's.
//!
//! Needs root (namespaces, cgroups, setns); `NODETUNE_SKIP_ROOT_TESTS=1` turns that into a skip.

mod kernel;
#[path = "support/socket_script.rs"]
mod socket_script;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kernel::{root_or_skip, run};
use nodetune::podnet::{self, Limits, NsId, NsRef, PodNetError, PodUid, count, procs};

/// The v1 `name=systemd` hierarchy: present on hybrid hosts, and any hierarchy's line names
/// the pod for the parser.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/systemd";

/// A process holding one listener, `established` connected pairs, `time_wait` connections
/// closed client-first and `close_wait` ones closed by the client only. Killed on drop.
struct Holder {
    child: Child,
}

impl Holder {
    /// `prefix` runs the script: `unshare -n` (a namespace of its own) or `nsenter -t P -n`.
    fn start(prefix: &[&str], established: usize, time_wait: usize, close_wait: usize) -> Self {
        let script = socket_script::python(&socket_script::SocketMix {
            established,
            time_wait,
            close_wait,
            backlog: 512,
            close_gap_secs: 0.002,
            hold_secs: 600,
        });
        // `sh` brings the namespace's loopback up, then becomes python: one PID throughout.
        let mut child = Command::new(prefix[0])
            .args(&prefix[1..])
            .args([
                "sh",
                "-c",
                "ip link set lo up && exec python3 -c \"$0\"",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn socket holder");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready", "socket holder did not start");
        Self { child }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup directory, removed on drop (after its processes are gone).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).expect("mkdir cgroup");
        Self(path)
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }
}

/// Removes the test's cgroup tree bottom-up once the holders are dead.
struct CgroupTree(PathBuf);

impl Drop for CgroupTree {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    remove(&e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}

/// `ss -tanH` in `pid`'s namespace, per state, netstat names, zeros left out.
fn ss_counts(pid: i32) -> BTreeMap<String, i64> {
    let out = run(Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "ss", "-tanH"]));
    let mut counts = BTreeMap::new();
    for state in out.lines().filter_map(|l| l.split_whitespace().next()) {
        let name = socket_script::netstat_name(state).unwrap_or(state);
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }
    counts
}

fn nonzero(m: BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    m.into_iter().filter(|(_, n)| *n != 0).collect()
}

fn ns_of(pid: i32) -> NsId {
    procs::ns_of(Path::new(&format!("/proc/{pid}/ns/net"))).expect("ns of pid")
}

/// Two fake pods and a stray namespace, alive while this lives.
/// Fields drop in order: the processes first, then their (by then empty) cgroups.
struct Fixture {
    pod_a: PodUid,
    pod_b: PodUid,
    /// Pod A's first process: its sandbox.
    sandbox_a: Holder,
    /// A second container of pod A, sharing its namespace.
    _container_a: Holder,
    /// A process of pod A in a namespace it made itself.
    nested: Holder,
    sandbox_b: Holder,
    /// A hostNetwork pod's only process: no namespace of its own.
    pod_host: PodUid,
    _host_net: Sleeper,
    _tree: CgroupTree,
}

/// A process in this namespace, killed on drop.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fixtures of tests running at once in this process get their own cgroups and pod UIDs.
static FIXTURES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn fixture() -> Fixture {
    let me = std::process::id();
    let n = FIXTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 0x1_0000;
    let top = PathBuf::from(CGROUP_ROOT).join(format!("ntpodnet-{me}-{n}"));
    let tree = CgroupTree(top.clone());
    let uid_a = format!("{me:08x}-{n:04x}-4aaa-8aaa-0000000000a1");
    let uid_b = format!("{me:08x}-{n:04x}-4bbb-8bbb-0000000000b2");
    // cgroupfs layout, under a cgroup root as the test harness's kubelets have.
    let cg_a = Cgroup::new(top.join(format!("kubepods/besteffort/pod{uid_a}")));
    // systemd layout.
    let cg_b = Cgroup::new(top.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid_b.replace('-', "_")
    )));

    let sandbox_a = Holder::start(&["unshare", "-n"], 4, 60, 7);
    cg_a.add(sandbox_a.pid());
    let pid_a = sandbox_a.pid().to_string();
    let container_a = Holder::start(&["nsenter", "-t", &pid_a, "-n"], 3, 20, 0);
    cg_a.add(container_a.pid());
    let nested = Holder::start(&["unshare", "-n"], 25, 90, 2);
    cg_a.add(nested.pid());
    let sandbox_b = Holder::start(&["unshare", "-n"], 2, 35, 1);
    cg_b.add(sandbox_b.pid());
    let uid_host = format!("{me:08x}-{n:04x}-4ccc-8ccc-0000000000c3");
    let cg_host = Cgroup::new(top.join(format!("kubepods/burstable/pod{uid_host}")));
    let host_net = Sleeper(Command::new("sleep").arg("600").spawn().expect("sleep"));
    cg_host.add(i32::try_from(host_net.0.id()).expect("pid"));
    Fixture {
        _tree: tree,
        pod_a: PodUid::parse(&uid_a).expect("uid a"),
        pod_b: PodUid::parse(&uid_b).expect("uid b"),
        sandbox_a,
        _container_a: container_a,
        nested,
        sandbox_b,
        pod_host: PodUid::parse(&uid_host).expect("uid host"),
        _host_net: host_net,
    }
}

/// A counter over the real /proc with default limits that walks at most once an hour, so every
/// pass after the first reads sockstat only.
fn hourly_counter() -> podnet::PodCounter {
    podnet::PodCounter::new(
        PathBuf::from("/proc"),
        Limits::default(),
        Duration::from_secs(3600),
    )
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[test]
fn pods_are_counted_in_their_sandbox_namespace_like_ss() {
    if !root_or_skip("pods_are_counted_in_their_sandbox_namespace_like_ss") {
        return;
    }
    let f = fixture();
    let proc_root = Path::new("/proc");
    let limits = Limits::default();
    let (map, truncated) = podnet::discover(proc_root, &limits, far()).expect("discover");
    assert!(!truncated);
    let find = |uid: &PodUid| {
        map.pods
            .iter()
            .find(|p| &p.pod == uid)
            .unwrap_or_else(|| panic!("pod {uid} not found in {map:?}"))
            .target
    };
    let (a, b) = (find(&f.pod_a), find(&f.pod_b));
    assert_eq!((a.pid, a.ns), (f.sandbox_a.pid(), ns_of(f.sandbox_a.pid())));
    assert_eq!((b.pid, b.ns), (f.sandbox_b.pid(), ns_of(f.sandbox_b.pid())));
    let nested_ns = ns_of(f.nested.pid());
    assert!(map.pods.iter().all(|p| p.target.ns != nested_ns), "{map:?}");
    // A hostNetwork pod: its sandbox is in this (the host's) namespace; the host counts cover it.
    assert!(map.host_network.contains(&f.pod_host), "{map:?}");
    assert!(map.pods.iter().all(|p| p.pod != f.pod_host), "{map:?}");
    assert!(map.nested_processes >= 1);

    let targets = [a, b];
    let walked = count::walk_all(proc_root, &targets, &limits, far()).expect("walk");
    let cheap = count::sockstat_all(proc_root, &targets, &limits, far());
    assert!(!walked.truncated && !cheap.truncated);
    for (i, target) in targets.iter().enumerate() {
        let w = walked.results[i].1.as_ref().expect("walked");
        let ss = ss_counts(target.pid);
        let total = w.counts.ipv4 + w.counts.ipv6;
        assert_eq!(nonzero(total.to_map()), ss, "pod namespace {i}");
        // sockstat's `tw` counts the kernel's timewait minisockets: TIME_WAIT, and the
        // orphaned FIN_WAIT2 sockets the kernel keeps in the same form (all of them, here).
        let state = |name: &str| ss.get(name).copied().unwrap_or_default();
        let tw = state("TIME_WAIT") + state("FIN_WAIT2");
        assert_eq!(w.sockstat.tw as i64, tw);
        let s = cheap.results[i].1.as_ref().expect("sockstat");
        assert_eq!(s.tw as i64, tw, "the cheap tier's TIME_WAIT");
    }
    // Pod A's two containers share one namespace, counted once: both holders' sockets.
    let a_tw = ss_counts(a.pid)
        .get("TIME_WAIT")
        .copied()
        .unwrap_or_default();
    assert!(a_tw >= 80, "both containers' TIME_WAIT: {a_tw}");

    // `tcpstat --all-namespaces` lists the nested namespace too, as made inside pod A.
    let (all, _) = podnet::discover_all(proc_root, &limits, far()).expect("all");
    let nested = all
        .iter()
        .find(|n| n.target.ns == nested_ns)
        .expect("nested listed");
    assert_eq!(
        (nested.pod.as_ref(), nested.inside_pod.as_ref()),
        (None, Some(&f.pod_a))
    );
}

#[test]
fn the_agent_tiers_walk_first_then_read_sockstat_only() {
    if !root_or_skip("the_agent_tiers_walk_first_then_read_sockstat_only") {
        return;
    }
    let f = fixture();
    let mut counter = hourly_counter();
    let first = counter.count().expect("first pass");
    assert!(first.walked);
    let second = counter.count().expect("second pass");
    assert!(!second.walked);
    for uid in [&f.pod_a, &f.pod_b] {
        let one = first
            .pods
            .iter()
            .find(|p| &p.pod == uid)
            .expect("walked pod");
        let two = second
            .pods
            .iter()
            .find(|p| &p.pod == uid)
            .expect("sockstat pod");
        assert!(two.walked, "per-state counts carried from the walk");
        assert_eq!(one.states, two.states);
        assert_eq!(one.sockstat.tw, two.sockstat.tw);
    }
}

#[test]
fn a_reused_pid_or_a_moved_process_is_never_entered() {
    if !root_or_skip("a_reused_pid_or_a_moved_process_is_never_entered") {
        return;
    }
    let f = fixture();
    let proc_root = Path::new("/proc");
    let pid = f.sandbox_a.pid();
    let start_time = procs::start_time_of(proc_root, pid).expect("start time");
    let real = NsRef {
        ns: ns_of(pid),
        pid,
        start_time,
    };
    // The PID now names a process started at another time: a reuse.
    let reused = NsRef {
        start_time: start_time + 1,
        ..real
    };
    // The process is no longer in the namespace it was found in.
    let moved = NsRef {
        ns: ns_of(f.nested.pid()),
        ..real
    };
    let limits = Limits::default();
    let walked = count::walk_all(proc_root, &[reused, moved], &limits, far()).expect("walk");
    assert!(
        matches!(walked.results[0].1, Err(PodNetError::PidReused { .. })),
        "{:?}",
        walked.results[0].1
    );
    assert!(
        matches!(
            walked.results[1].1,
            Err(PodNetError::NamespaceChanged { .. })
        ),
        "{:?}",
        walked.results[1].1
    );
    let cheap = count::sockstat_all(proc_root, &[reused, moved], &limits, far());
    assert!(cheap.results.iter().all(|(_, r)| r.is_err()));

    // Gone: no process has this PID (above pid_max); nothing is read or entered.
    let gone = NsRef {
        pid: i32::MAX - 7,
        ..real
    };
    assert!(matches!(
        count::sockstat_of(proc_root, &gone),
        Err(PodNetError::Gone { .. })
    ));
}

#[test]
fn the_namespace_bound_truncates_instead_of_stalling() {
    if !root_or_skip("the_namespace_bound_truncates_instead_of_stalling") {
        return;
    }
    let f = fixture();
    let proc_root = Path::new("/proc");
    let (map, _) = podnet::discover(proc_root, &Limits::default(), far()).expect("discover");
    let ours: Vec<NsRef> = map
        .pods
        .iter()
        .filter(|p| p.pod == f.pod_a || p.pod == f.pod_b)
        .map(|p| p.target)
        .collect();
    assert_eq!(ours.len(), 2);
    let one = Limits {
        max_namespaces: 1,
        ..Limits::default()
    };
    let walked = count::walk_all(proc_root, &ours, &one, far()).expect("walk");
    assert_eq!((walked.results.len(), walked.truncated), (1, true));
    // A deadline already past: nothing is entered at all.
    let late = count::walk_all(proc_root, &ours, &Limits::default(), Instant::now()).expect("walk");
    assert_eq!((late.results.len(), late.truncated), (0, true));
}

/// `nodetune tcpstat --all-namespaces -o json`: every fake pod's namespace with `ss`'s counts,
/// the namespace made inside pod A listed as such, never as the pod's.
#[test]
fn cli_tcpstat_all_namespaces_lists_pods_like_ss() {
    if !root_or_skip("cli_tcpstat_all_namespaces_lists_pods_like_ss") {
        return;
    }
    let f = fixture();
    let stdout = run(Command::new(env!("CARGO_BIN_EXE_nodetune")).args([
        "tcpstat",
        "--all-namespaces",
        "-o",
        "json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert!(json["host"]["total"].is_object(), "{json}");
    let lines = json["namespaces"].as_array().expect("namespaces");
    let by_inode = |pid: i32| {
        let ino = ns_of(pid).ino;
        lines
            .iter()
            .find(|l| l["inode"] == ino)
            .unwrap_or_else(|| panic!("namespace of {pid} not listed: {json}"))
    };
    for (pid, uid) in [(f.sandbox_a.pid(), &f.pod_a), (f.sandbox_b.pid(), &f.pod_b)] {
        let line = by_inode(pid);
        assert_eq!(line["pod"]["uid"], uid.as_str(), "{line}");
        let counted: BTreeMap<String, i64> =
            serde_json::from_value(line["total"].clone()).expect("total");
        assert_eq!(nonzero(counted), ss_counts(pid), "{line}");
    }
    let nested = by_inode(f.nested.pid());
    assert!(nested["pod"].is_null(), "{nested}");
    assert_eq!(nested["insidePod"]["uid"], f.pod_a.as_str());
    let counted: BTreeMap<String, i64> =
        serde_json::from_value(nested["total"].clone()).expect("total");
    assert_eq!(nonzero(counted), ss_counts(f.nested.pid()));
}

/// The agent's report section: the fake pods among the top pods, named from the watch, with the
/// per-state counts `ss` gives in their namespaces.
#[test]
fn the_reports_top_pods_carry_ss_counts_and_names() {
    if !root_or_skip("the_reports_top_pods_carry_ss_counts_and_names") {
        return;
    }
    let f = fixture();
    let mut counter = hourly_counter();
    let pass = counter.count().expect("pass");
    let mut names = nodetune::agent::pods::PodNames::new();
    names.insert(f.pod_a.to_string(), ("web".into(), "squid-0".into()));
    let summary = nodetune::agent::pods::summarise(&pass, &names);
    let top_a = summary
        .top
        .iter()
        .find(|p| p.uid == f.pod_a.as_str())
        .unwrap_or_else(|| panic!("pod A not in the top pods: {summary:?}"));
    assert_eq!(
        (top_a.namespace.as_str(), top_a.name.as_str()),
        ("web", "squid-0")
    );
    assert_eq!(nonzero(top_a.states.clone()), ss_counts(f.sandbox_a.pid()));
    // Pod B has fewer TIME_WAIT than the pod As of tests running beside this one, so it may
    // miss the top 10: its counts are checked in the pass the summary is made from.
    let b = pass
        .pods
        .iter()
        .find(|p| p.pod == f.pod_b)
        .expect("pod B counted");
    let b_total = b.states.ipv4 + b.states.ipv6;
    assert_eq!(nonzero(b_total.to_map()), ss_counts(f.sandbox_b.pid()));
    assert!(summary.namespaces >= 2);
    assert!(
        summary.states["TIME_WAIT"]
            >= top_a.states["TIME_WAIT"]
                + b_total.get(nodetune::tcpstat::TcpState::TimeWait) as i64
    );
}

/// On a node with more pods than one pass may walk, walks take turns instead of always
/// walking the same first pods.
#[test]
fn walks_cut_short_take_turns() {
    if !root_or_skip("walks_cut_short_take_turns") {
        return;
    }
    let _f = fixture();
    let one = Limits {
        max_namespaces: 1,
        ..Limits::default()
    };
    let mut counter = podnet::PodCounter::new(PathBuf::from("/proc"), one, Duration::ZERO);
    let first = counter.count().expect("first walk");
    let second = counter.count().expect("second walk");
    assert!(first.walked && second.walked && first.truncated);
    assert_eq!((first.pods.len(), second.pods.len()), (1, 1));
    assert_ne!(
        first.pods[0].pod, second.pods[0].pod,
        "the second walk resumes"
    );
}

/// The way in is reusable for tuning: a `/proc/sys/net` file opened inside a pod's namespace by
/// `inside_each` writes that namespace's value; this thread's namespace keeps its own.
#[test]
fn work_inside_a_pod_namespace_stays_there() {
    if !root_or_skip("work_inside_a_pod_namespace_stays_there") {
        return;
    }
    let f = fixture();
    let proc_root = Path::new("/proc");
    let key = "/proc/sys/net/ipv4/tcp_fin_timeout";
    let ours_before = std::fs::read_to_string(key).expect("read");
    let pid = f.sandbox_a.pid();
    let target = NsRef {
        ns: ns_of(pid),
        pid,
        start_time: procs::start_time_of(proc_root, pid).expect("start time"),
    };
    let far = Instant::now() + Duration::from_secs(60);
    let pass = count::inside_each(proc_root, &[target], &Limits::default(), far, |_, _| {
        std::fs::write("/proc/sys/net/ipv4/tcp_fin_timeout", "37").map_err(|e| PodNetError::Read {
            path: "tcp_fin_timeout".into(),
            reason: e.to_string(),
        })
    })
    .expect("pass");
    assert!(pass.results[0].1.is_ok(), "{:?}", pass.results[0].1);
    let inside = run(Command::new("nsenter").args([
        "-t",
        &pid.to_string(),
        "-n",
        "sysctl",
        "-n",
        "net.ipv4.tcp_fin_timeout",
    ]));
    assert_eq!(inside.trim(), "37");
    assert_eq!(std::fs::read_to_string(key).expect("read"), ours_before);
}
