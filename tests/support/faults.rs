//! Fault injection for control-plane tests: stop and restart a control-plane component
//! (etcd, kube-apiserver, ...), SIGKILL a process the node shim runs, look for panics in logs.
//!
//! Components are the processes `tests/cluster/up` started, found through their pid files in
//! `<cluster dir>/pids/`. A restart reuses the exact command line, environment and working
//! directory read from `/proc` before the stop, appends to the same log file and writes the new
//! pid back, so `tests/cluster/down` (and the watchdog) stop the new process as they would have
//! stopped the old one.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Cluster;
use super::shim::ProcRecord;

/// How a stopped component is started again.
#[derive(Debug)]
pub struct StoppedComponent {
    name: String,
    dir: PathBuf,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
}

fn pid_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("pids").join(format!("{name}.pid"))
}

/// The pid `up` (or a restart here) recorded for a component.
pub fn component_pid(cluster: &Cluster, name: &str) -> anyhow::Result<i32> {
    let path = pid_file(cluster.dir(), name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("pid in {}: {text:?}", path.display()))
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends `sig` to one process. Returns false if it did not exist.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions; the pids are processes this test's
    // cluster started.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Sends `sig` to a process group (the components lead their own, see `up`).
fn signal_group(pid: i32, sig: i32) {
    // SAFETY: as in `signal`.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

fn split_nul(bytes: Vec<u8>) -> Vec<OsString> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect()
}

/// Stops a component (SIGTERM to its process group, SIGKILL after `grace`) and returns what is
/// needed to start it again. The process is gone when this returns.
pub async fn stop_component(
    cluster: &Cluster,
    name: &str,
    grace: Duration,
) -> anyhow::Result<StoppedComponent> {
    let pid = component_pid(cluster, name)?;
    if !alive(pid) {
        bail!("{name} (pid {pid}) is not running");
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let argv = split_nul(std::fs::read(proc_dir.join("cmdline")).context("cmdline")?);
    let env = split_nul(std::fs::read(proc_dir.join("environ")).context("environ")?)
        .into_iter()
        .filter_map(|kv| {
            let bytes = kv.into_vec();
            let eq = bytes.iter().position(|b| *b == b'=')?;
            Some((
                OsString::from_vec(bytes[..eq].to_vec()),
                OsString::from_vec(bytes[eq + 1..].to_vec()),
            ))
        })
        .collect();
    let cwd = std::fs::read_link(proc_dir.join("cwd")).context("cwd")?;
    if argv.is_empty() {
        bail!("{name} (pid {pid}) has no command line");
    }
    signal_group(pid, libc::SIGTERM);
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() >= grace {
            signal_group(pid, libc::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(StoppedComponent {
        name: name.to_string(),
        dir: cluster.dir().to_path_buf(),
        argv,
        env,
        cwd,
    })
}

impl StoppedComponent {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the component again as `up` did: its own process group, stdin closed, output
    /// appended to its log; the new pid goes to its pid file. Returns the pid.
    pub fn start(&self) -> anyhow::Result<i32> {
        let log_path = self.dir.join("logs").join(format!("{}.log", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = std::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("restart {}", self.name))?;
        let pid = i32::try_from(child.id()).context("pid")?;
        std::fs::write(pid_file(&self.dir, &self.name), format!("{pid}\n"))
            .context("write pid file")?;
        // Reap it when `down` stops it: a zombie would make `down` wait out its grace period.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }
}

/// Waits until the apiserver answers `/readyz` with `ok` (through the admin client).
pub async fn wait_apiserver_ready(cluster: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    let client = cluster.client();
    super::wait_for(
        "kube-apiserver /readyz",
        timeout,
        Duration::from_millis(250),
        || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client
                    .request_text(req)
                    .await
                    .ok()
                    .filter(|t| t.trim() == "ok")
                    .map(|_| ()))
            }
        },
    )
    .await
}

/// The running process of the container the shim runs for `pred`, if any.
pub fn running_record(cluster: &Cluster, pred: impl Fn(&ProcRecord) -> bool) -> Option<ProcRecord> {
    cluster.with_shim(|s| {
        s.records()
            .into_iter()
            .find(|r| r.running && r.pid.is_some() && pred(r))
    })
}

/// SIGKILLs the running process of a container (the shim then restarts it in place, as the
/// kubelet would). Returns the record as it was before the kill.
pub fn sigkill_container(
    cluster: &Cluster,
    pred: impl Fn(&ProcRecord) -> bool,
) -> anyhow::Result<ProcRecord> {
    let rec = running_record(cluster, pred).context("no running process matches")?;
    let pid = rec.pid.and_then(|p| i32::try_from(p).ok()).context("pid")?;
    if !signal(pid, libc::SIGKILL) {
        bail!("SIGKILL {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(rec)
}

/// Lines that show a Rust panic or a Go panic/fatal error, in every component log and every
/// log of a process the shim started, as `file: line`.
pub fn panics(cluster: &Cluster) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cluster.dir().join("logs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.extend(cluster.with_shim(|s| s.records().into_iter().map(|r| r.log).collect::<Vec<_>>()));
    files.sort();
    files.dedup();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines() {
            if line.contains("panicked at")
                || line.starts_with("panic: ")
                || line.starts_with("fatal error: ")
            {
                out.push(format!("{}: {line}", f.display()));
            }
        }
    }
    out
}

/// What [`sigkill_after_change`] saw.
#[derive(Clone, Debug)]
pub struct KillOutcome {
    /// Whether a watched key changed before the timeout (else the kill came at the timeout).
    pub change_seen: bool,
    /// From the start of the watch to the kill.
    pub waited: Duration,
}

/// Reads the sysctl `key` (dotted) through /proc/sys of the calling thread's network
/// namespace, whitespace normalised as `sysctl -n` output is in the tests.
fn read_sysctl(key: &str) -> Option<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// From a thread that joins the network namespace `netns`, watches the sysctls in `baseline`
/// and SIGKILLs `pid` once `after` has passed since the first of them changed, that is at a
/// chosen point of a pass that writes them; at `timeout` if none changes. Lets a test kill a
/// writer in the middle of its work without any hook in the product.
pub fn sigkill_after_change(
    netns: &str,
    baseline: BTreeMap<String, String>,
    pid: i32,
    after: Duration,
    timeout: Duration,
) -> std::thread::JoinHandle<anyhow::Result<KillOutcome>> {
    let ns_path = Path::new("/run/netns").join(netns);
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&ns_path).with_context(|| format!("open {}", ns_path.display()))?;
        // SAFETY: setns(2) on a namespace fd we own; it moves only this thread, which does
        // nothing else and ends below.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                ns_path.display(),
                std::io::Error::last_os_error()
            );
        }
        let start = Instant::now();
        let mut change_seen = false;
        while start.elapsed() < timeout {
            if baseline
                .iter()
                .any(|(k, v)| read_sysctl(k).is_some_and(|now| now != *v))
            {
                change_seen = true;
                std::thread::sleep(after);
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        signal(pid, libc::SIGKILL);
        Ok(KillOutcome {
            change_seen,
            waited: start.elapsed(),
        })
    })
}
