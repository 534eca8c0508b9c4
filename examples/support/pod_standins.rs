//! Pod stand-ins for the agent benchmark: `unshare -n` processes holding a few loopback TCP
//! sockets, each placed in a cgroup shaped as the kubelet's systemd driver makes on cgroup v2
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
//! cri-containerd-<id>.scope`), so `nodetune::podnet` finds them from `/proc` as it finds real
//! pods: the cgroup names the pod, the only (so oldest) process is the sandbox.
//!
//! Every cgroup of one set sits under a directory of its own, `ntbench-<pid>-<n>` at the top of
//! the cgroup v2 hierarchy, so nothing else on the machine is touched and cleanup is one
//! `cgroup.kill` and a few `rmdir`s. Cleanup runs on drop (also when the benchmark fails) and
//! a set whose owning process is gone (killed) is swept away by the next one.
//!
//! Plain std and anyhow: `bench_agent` includes it with `#[path]`, and so does its kernel test.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// What each stand-in holds: a listener, `pairs` connected pairs (two ESTABLISHED sockets
/// each), and one connection closed client-first every `churn_secs` (after a first burst of
/// `time_wait`), so about `time_wait` sockets sit in TIME_WAIT at any time (they last 60 s).
/// Kept small on purpose: the machine is shared, and other agents on it see these pods too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub pairs: usize,
    pub time_wait: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            pairs: 5,
            time_wait: 4,
        }
    }
}

impl Shape {
    /// The holder, for `python3 -c`.
    pub fn script(&self) -> String {
        let Shape { pairs, time_wait } = *self;
        let every = 60.0 / time_wait.max(1) as f64;
        format!(
            r#"
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64)
port = srv.getsockname()[1]
held = []
for _ in range({pairs}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); held += [c, s]
def churn():
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); s.recv(1); s.close()
for _ in range({time_wait}):
    churn()
print("ready", flush=True)
while True:
    time.sleep({every}); churn()
"#
        )
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`'s text: `/sys/fs/cgroup`
/// on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The cgroup of pod `uid` (dashed UUID) below a set's directory, as the kubelet's systemd
/// driver names it: dashes become `_` in the slice, the container ID is 64 hex digits.
pub fn pod_cgroup(uid: &str) -> PathBuf {
    let slice_uid = uid.replace('-', "_");
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).collect();
    let container = format!("{hex:0<64}");
    PathBuf::from("kubepods.slice/kubepods-besteffort.slice")
        .join(format!("kubepods-besteffort-pod{slice_uid}.slice"))
        .join(format!("cri-containerd-{container}.scope"))
}

/// A set directory's name: `ntbench-<owner pid>-<n>`.
const SET_PREFIX: &str = "ntbench-";

/// The owner PID in a set directory's name.
pub fn set_owner(name: &str) -> Option<i32> {
    name.strip_prefix(SET_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// One running stand-in.
pub struct StandIn {
    pub uid: String,
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl StandIn {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A set of stand-ins and the cgroup directory holding them.
pub struct StandIns {
    dir: PathBuf,
    program: String,
    shape: Shape,
    pods: Vec<StandIn>,
}

static SETS: AtomicUsize = AtomicUsize::new(0);

impl StandIns {
    /// An empty set under the machine's cgroup v2 hierarchy, holders run by `python3`.
    pub fn new(shape: Shape) -> anyhow::Result<Self> {
        Self::with_program("python3", shape)
    }

    /// The same with another interpreter (tests use one that fails).
    pub fn with_program(program: &str, shape: Shape) -> anyhow::Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = cgroup2_mount(&mountinfo).context("no cgroup v2 hierarchy is mounted")?;
        let swept = sweep_stale(&root);
        if swept > 0 {
            eprintln!("removed {swept} stand-in set(s) left by a run that was killed");
        }
        let n = SETS.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("{SET_PREFIX}{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(StandIns {
            dir,
            program: program.to_string(),
            shape,
            pods: Vec::new(),
        })
    }

    /// The set's cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pods(&self) -> &[StandIn] {
        &self.pods
    }

    /// Starts the stand-in of pod `uid` in its own namespace and cgroup (not waiting for it).
    pub fn add(&mut self, uid: &str) -> anyhow::Result<u32> {
        let cgroup = self.dir.join(pod_cgroup(uid));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        // `sh` brings the namespace's loopback up, then becomes the holder: one PID throughout,
        // moved into the pod's cgroup right away (before it makes a socket).
        let mut child = Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "ip link set lo up && exec \"$1\" -c \"$0\"",
            ])
            .args([self.shape.script(), self.program.clone()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start unshare -n")?;
        let moved = std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string());
        let stdout = child.stdout.take().map(BufReader::new);
        self.pods.push(StandIn {
            uid: uid.to_string(),
            child,
            stdout,
        });
        moved.with_context(|| format!("move the stand-in into {}", cgroup.display()))?;
        Ok(self.pods.last().map(StandIn::pid).unwrap_or_default())
    }

    /// Waits until every stand-in said `ready` (its sockets are made). The pipes stay open.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        for pod in &mut self.pods {
            let Some(out) = pod.stdout.as_mut() else {
                continue;
            };
            let mut line = String::new();
            out.read_line(&mut line)?;
            ensure!(
                line.trim() == "ready",
                "the stand-in of pod {} said {line:?} (exit: {:?})",
                pod.uid,
                pod.child.try_wait().ok().flatten()
            );
        }
        Ok(())
    }

    /// Kills every process of the set (`cgroup.kill`, then each child), reaps them and removes
    /// the cgroups. Safe to call twice.
    pub fn cleanup(&mut self) -> anyhow::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        kill_tree(&self.dir);
        for pod in &mut self.pods {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
        self.pods.clear();
        remove_tree(&self.dir, Duration::from_secs(10))
    }
}

impl Drop for StandIns {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("stand-in cleanup: {e:#}");
        }
    }
}

/// `cgroup.kill` (Linux 5.14) kills every process below `dir`, forks in flight included.
fn kill_tree(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Older kernels: each process listed, one by one.
        for pid in procs_below(dir) {
            // SAFETY: kill(2) with a PID read from our own cgroup; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// PIDs in `dir` and every cgroup below it.
fn procs_below(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        out.extend(procs_below(&sub));
    }
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `dir` and its cgroups, deepest first; a cgroup whose processes are still exiting
/// refuses `rmdir` (EBUSY) for a moment, so this retries until `within`.
fn remove_tree(dir: &Path, within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        match remove_once(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= until => {
                bail!("cannot remove {}: {e}", dir.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn remove_once(dir: &Path) -> std::io::Result<()> {
    for sub in subdirs(dir) {
        remove_once(&sub)?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the sets under `root` whose owner process is gone (a benchmark killed before its
/// cleanup ran); returns how many.
pub fn sweep_stale(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(set_owner) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        kill_tree(&entry.path());
        if remove_tree(&entry.path(), Duration::from_secs(10)).is_ok() {
            swept += 1;
        }
    }
    swept
}
