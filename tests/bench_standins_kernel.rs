//! Kernel tests for the pod stand-ins of `bench_agent --pods` (`examples/support/pod_standins.rs`):
//! the stand-ins must be pods to `nodetune::podnet` exactly as the agent finds them (cgroup v2,
//! systemd layout, the stand-in is the sandbox), hold the sockets they promise, and leave no
//! process or cgroup behind, whether the set is dropped, fails to start or its owner was killed.
//!
//! Needs root (namespaces, cgroups, setns); `NODETUNE_SKIP_ROOT_TESTS=1` turns that into a skip.

mod kernel;
#[path = "../examples/support/pod_standins.rs"]
mod pod_standins;

use std::path::Path;
use std::time::{Duration, Instant};

use kernel::root_or_skip;
use nodetune::podnet::{self, Limits, PodUid, cgroup, count};
use pod_standins::{Shape, StandIns, cgroup2_mount, pod_cgroup, set_owner, sweep_stale};

const UID: &str = "0d7c3b2a-55e1-4c8e-9f0a-1234567890ab";

fn uid(i: usize) -> String {
    format!("{:08x}-b0b0-4000-8000-{i:012x}", std::process::id())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

#[test]
fn stand_in_cgroups_name_their_pod_for_podnet() {
    for prefix in ["", "ntbench-42-0/"] {
        let path = format!("/{prefix}{}", pod_cgroup(UID).display());
        assert!(path.contains(
            "kubepods-besteffort-pod0d7c3b2a_55e1_4c8e_9f0a_1234567890ab.slice/cri-containerd-"
        ));
        assert_eq!(
            cgroup::pod_of(&format!("0::{path}\n")),
            Ok(PodUid::parse(UID)),
            "{path}"
        );
        // A hybrid host: the v1 lines name no pod, the unified line does.
        let hybrid = format!("9:name=systemd:/\n4:memory:/some/where\n0::{path}\n");
        assert_eq!(cgroup::pod_of(&hybrid), Ok(PodUid::parse(UID)));
    }
    assert_eq!(set_owner("ntbench-4242-3"), Some(4242));
    assert_eq!(set_owner("ntbench-x-3"), None);
    assert_eq!(set_owner("kubepods.slice"), None);
}

#[test]
fn cgroup_v2_mount_is_found_on_pure_and_hybrid_hosts() {
    let pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
    assert_eq!(cgroup2_mount(pure), Some("/sys/fs/cgroup".into()));
    let hybrid = "31 25 0:27 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                  32 31 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                  33 31 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
    assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
    assert_eq!(
        cgroup2_mount("33 31 0:29 / /x rw - cgroup cgroup rw\n"),
        None
    );
}

#[test]
fn stand_ins_are_pods_to_podnet_with_their_sockets_and_leave_nothing() {
    if !root_or_skip("stand_ins_are_pods_to_podnet_with_their_sockets_and_leave_nothing") {
        return;
    }
    let shape = Shape {
        pairs: 5,
        time_wait: 2,
    };
    let mut set = StandIns::new(shape).expect("a stand-in set");
    let uids: Vec<String> = (0..3).map(uid).collect();
    for u in &uids {
        set.add(u).expect("stand-in started");
    }
    set.wait_ready().expect("stand-ins ready");
    let pids: Vec<u32> = set.pods().iter().map(|p| p.pid()).collect();
    let dir = set.dir().to_path_buf();

    let limits = Limits::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (map, _) = podnet::discover(Path::new("/proc"), &limits, deadline).expect("discover");
    for (u, pid) in uids.iter().zip(&pids) {
        let found = map
            .pods
            .iter()
            .find(|p| p.pod.as_str() == u)
            .unwrap_or_else(|| panic!("pod {u} not found: {map:?}"));
        assert_eq!(found.target.pid, *pid as i32, "the stand-in is the sandbox");
        let walked =
            count::walk_all(Path::new("/proc"), &[found.target], &limits, deadline).expect("walk");
        let (_, result) = walked.results.into_iter().next().expect("one result");
        let counts = result.expect("counted");
        let total = counts.counts.ipv4 + counts.counts.ipv6;
        use nodetune::tcpstat::TcpState;
        assert_eq!(total.get(TcpState::Established), 10, "pod {u}");
        assert_eq!(total.get(TcpState::Listen), 1, "pod {u}");
        assert!(total.get(TcpState::TimeWait) >= 2, "pod {u}: {total:?}");
    }

    set.cleanup().expect("cleanup");
    for pid in pids {
        assert!(!alive(pid), "stand-in {pid} still runs");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    drop(set);
}

#[test]
fn a_set_that_fails_to_start_is_removed_on_drop() {
    if !root_or_skip("a_set_that_fails_to_start_is_removed_on_drop") {
        return;
    }
    // An interpreter that exits at once: the stand-in never says ready.
    let mut set = StandIns::with_program("false", Shape::default()).expect("a set");
    set.add(&uid(7)).expect("spawned");
    let dir = set.dir().to_path_buf();
    let err = set.wait_ready().expect_err("must fail");
    assert!(err.to_string().contains(&uid(7)), "{err:#}");
    drop(set);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn sets_of_a_killed_owner_are_swept() {
    if !root_or_skip("sets_of_a_killed_owner_are_swept") {
        return;
    }
    let root = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"))
        .expect("cgroup v2");
    // A process that has exited: its PID names the dead owner.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("reaped");
    let stale = root.join(format!("ntbench-{dead}-0"));
    std::fs::create_dir_all(stale.join(pod_cgroup(&uid(9)))).expect("mkdir");
    // A live owner's set (ours) stays. (Another test's new set may sweep the stale one
    // first: what counts is that it is gone.)
    let live = StandIns::new(Shape::default()).expect("a set");
    sweep_stale(&root);
    assert!(!stale.exists(), "{} not swept", stale.display());
    assert!(live.dir().exists(), "a live owner's set was swept");
}
