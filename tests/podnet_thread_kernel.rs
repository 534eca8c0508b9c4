//! The thread that enters pods' namespaces is one long-lived thread, back in the agent's own
//! namespace between passes: a thread per pass cost the agent memory each pass (its stack and
//! malloc arena), and an idle thread left in a pod's namespace would keep that namespace alive.
//! A file of its own: the test looks at that thread between passes, so no other test of this
//! process may send it work meanwhile.
//!
//! Needs root (namespaces, setns); `NODETUNE_SKIP_ROOT_TESTS=1` turns that into a skip.

mod kernel;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kernel::root_or_skip;
use nodetune::podnet::{Limits, NsRef, PodNetError, count, procs};

/// A process alone in a new network namespace, killed on drop.
struct Pod(Child);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the calling thread is: `/proc/thread-self` resolves to `PID/task/TID`.
fn this_thread(_: &Path, _: &NsRef) -> Result<PathBuf, PodNetError> {
    std::fs::read_link("/proc/thread-self").map_err(|e| PodNetError::Read {
        path: "/proc/thread-self".into(),
        reason: e.to_string(),
    })
}

/// The task that ran one pass, as `/proc/PID/task/TID`.
fn pass_thread(target: NsRef) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pass = count::inside_each(
        Path::new("/proc"),
        &[target],
        &Limits::default(),
        deadline,
        this_thread,
    )
    .expect("pass");
    let (_, result) = pass.results.pop().expect("one result");
    Path::new("/proc").join(result.expect("ran inside the pod"))
}

#[test]
fn passes_share_one_thread_that_goes_home_between_them() {
    if !root_or_skip("passes_share_one_thread_that_goes_home_between_them") {
        return;
    }
    let pod = Pod(Command::new("unshare")
        .args(["-n", "sleep", "600"])
        .spawn()
        .expect("unshare"));
    let pid = i32::try_from(pod.0.id()).expect("pid");
    let proc_root = Path::new("/proc");
    let home = procs::own_ns(proc_root).expect("own namespace");
    // unshare(1) execs sleep after making the namespace: wait until the PID is in it.
    let started = Instant::now();
    let pod_ns = loop {
        let ns = procs::ns_of(&proc_root.join(format!("{pid}/ns/net"))).expect("ns of pod");
        if ns != home {
            break ns;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no namespace");
        std::thread::sleep(Duration::from_millis(10));
    };
    let target = NsRef {
        ns: pod_ns,
        pid,
        start_time: procs::start_time_of(proc_root, pid).expect("start time"),
    };

    let first = pass_thread(target);
    // The pass is over and the thread lives on, in this test's namespace, not the pod's.
    let idle = procs::ns_of(&first.join("ns/net")).expect("the thread outlives the pass");
    assert_eq!(
        idle,
        home,
        "{} stayed in the pod's namespace",
        first.display()
    );
    let second = pass_thread(target);
    assert_eq!(first, second, "the second pass ran on the same thread");
}
