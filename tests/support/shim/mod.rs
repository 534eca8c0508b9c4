//! Node shim: plays the kubelet for pods bound to simulated nodes. Test support only.
//!
//! For each pod whose `spec.nodeName` is a registered simulated node:
//! - containers whose image's last path component starts with `nodetune` run the locally
//!   built binary inside the node's network namespace (`ip netns exec`), with the
//!   container's arguments and environment (downward API, ConfigMap/Secret refs and `$(VAR)`
//!   expansion resolved), hostPath mount paths rewritten to the node's root directory, and a
//!   per-pod kubeconfig (env `KUBECONFIG`) holding the apiserver URL as seen from the node,
//!   the cluster CA and a TokenRequest token bound to the pod, so the process authenticates
//!   as the pod's ServiceAccount and RBAC applies;
//! - other containers are only reported as running;
//! - status goes through `pods/status` (Running, Ready, containerStatuses); a process that
//!   dies is reported not ready and restarted with capped exponential backoff (restartCount
//!   counts restarts, as the kubelet's does);
//! - a pod with a deletionTimestamp gets SIGTERM, SIGKILL after its grace period (capped),
//!   and is then deleted with grace 0, which lets the garbage collector and the DaemonSet
//!   controller proceed.
//!
//! stdout/stderr of each container go to `<pods_dir>/<ns>_<pod>_<uid>/<container>.log`.
//! hostPath volumes under /proc, /sys and /dev map to the real paths: a process in the
//! namespace sees its own namespace's /proc/sys/net there, which is what the agent tunes.
//! configMap volumes are projected at container start and refreshed every
//! [`spec::CONFIG_MAP_SYNC`] while it runs, as a kubelet's pod sync does. Not emulated: other volume types,
//! probes, init containers, resource limits.
//!
//! Modules by job: this one keeps the public face and the pod watch; [`pod`] runs one pod
//! (credentials, status), [`container`] one container's process and restarts, [`spec`]
//! what the kubelet computes from a pod spec (environment, hostPath mapping, `$(VAR)`).

mod container;
mod pod;
mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use pod::run_pod;

/// What the shim needs to know about the cluster and the binary it runs.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    /// The binary run for nodetune containers.
    pub agent_bin: PathBuf,
    /// Apiserver URL as seen from inside node namespaces.
    pub server: String,
    /// CA bundle that verifies the apiserver's serving certificate.
    pub ca_file: PathBuf,
    /// Per-pod directories (logs, kubeconfig, token) go here.
    pub pods_dir: PathBuf,
    /// First restart delay; doubles per crash up to `backoff_cap` (the kubelet: 10 s / 5 min;
    /// shorter here so tests observe restarts quickly).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Cap on a pod's terminationGracePeriodSeconds.
    pub max_grace: Duration,
    /// Lifetime asked for service-account tokens; refreshed at 80 %.
    pub token_ttl_secs: i64,
}

impl ShimConfig {
    pub fn new(agent_bin: PathBuf, server: String, ca_file: PathBuf, pods_dir: PathBuf) -> Self {
        ShimConfig {
            agent_bin,
            server,
            ca_file,
            pods_dir,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(16),
            max_grace: Duration::from_secs(10),
            token_ttl_secs: 3600,
        }
    }
}

/// A simulated node as the shim sees it.
#[derive(Clone, Debug)]
pub struct ShimNode {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub root: PathBuf,
}

/// What the shim did for one container (kept after the pod is gone, for assertions).
#[derive(Clone, Debug, Default)]
pub struct ProcRecord {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    pub node: String,
    pub netns: String,
    /// Pid of the current (or last) process; it is the binary itself (`ip netns exec` execs).
    pub pid: Option<u32>,
    pub running: bool,
    /// How many times a process was started.
    pub starts: u32,
    pub last_exit: Option<String>,
    /// Arguments after the binary, and the environment, as passed.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    No,
    /// Stop the processes; `delete_pod`: then delete the pod with grace 0 (it had a
    /// deletionTimestamp); otherwise it is gone already or the node/shim goes away.
    Terminate {
        delete_pod: bool,
    },
}

struct PodHandle {
    node: String,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

struct Shared {
    cfg: ShimConfig,
    client: kube::Client,
    nodes: Mutex<HashMap<String, ShimNode>>,
    pods: Mutex<HashMap<String, PodHandle>>,
    procs: Mutex<BTreeMap<(String, String), ProcRecord>>,
    rescan: mpsc::UnboundedSender<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running shim. [`Shim::shutdown`] (or drop) kills every process it started.
pub struct Shim {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Shim {
    /// Starts watching pods. Must be called within a tokio runtime.
    pub fn start(client: kube::Client, cfg: ShimConfig) -> Shim {
        let (rescan, rescan_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cfg,
            client,
            nodes: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            procs: Mutex::new(BTreeMap::new()),
            rescan,
        });
        let task = tokio::spawn(run(shared.clone(), rescan_rx));
        Shim { shared, task }
    }

    /// Makes a node's pods the shim's business (pods already bound to it are picked up).
    pub fn register_node(&self, node: ShimNode) {
        let name = node.name.clone();
        lock(&self.shared.nodes).insert(name.clone(), node);
        let _ = self.shared.rescan.send(name);
    }

    /// Stops every process on the node and forgets it.
    pub fn unregister_node(&self, name: &str) {
        lock(&self.shared.nodes).remove(name);
        let mut pods = lock(&self.shared.pods);
        let uids: Vec<String> = pods
            .iter()
            .filter(|(_, h)| h.node == name)
            .map(|(u, _)| u.clone())
            .collect();
        for uid in uids {
            if let Some(h) = pods.remove(&uid) {
                h.stop.send_replace(Stop::Terminate { delete_pod: false });
            }
        }
        drop(pods);
        kill_records(&self.shared, |r| r.node == name);
    }

    /// Every container the shim ever handled.
    pub fn records(&self) -> Vec<ProcRecord> {
        lock(&self.shared.procs).values().cloned().collect()
    }

    /// Containers of the pod `namespace/name` (the latest pod of that name).
    pub fn pod_records(&self, namespace: &str, name: &str) -> Vec<ProcRecord> {
        self.records()
            .into_iter()
            .filter(|r| r.namespace == namespace && r.pod == name)
            .collect()
    }

    /// The captured stdout/stderr of all containers of a pod.
    pub fn pod_log(&self, namespace: &str, name: &str) -> String {
        let mut out = String::new();
        for r in self.pod_records(namespace, name) {
            let text = std::fs::read_to_string(&r.log).unwrap_or_default();
            let _ = writeln!(
                out,
                "===== {}/{} [{}] =====\n{text}",
                r.pod, r.container, r.node
            );
        }
        out
    }

    /// A summary of every record plus the tail of each log (for failure output).
    pub fn describe(&self) -> String {
        let mut out = String::from("===== node shim =====\n");
        for r in self.records() {
            let _ = writeln!(
                out,
                "{}/{} container={} node={} pid={:?} running={} starts={} last_exit={:?} args={:?}",
                r.namespace,
                r.pod,
                r.container,
                r.node,
                r.pid,
                r.running,
                r.starts,
                r.last_exit,
                r.args
            );
            // What a hung process is doing: its scheduler state and where it sleeps.
            if let Some(pid) = r.pid.filter(|_| r.running) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let state = status
                    .lines()
                    .find(|l| l.starts_with("State:"))
                    .unwrap_or("State: ?");
                let threads = status
                    .lines()
                    .find(|l| l.starts_with("Threads:"))
                    .unwrap_or("Threads: ?");
                let wchan =
                    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                let _ = writeln!(out, "    {state}; {threads}; wchan {wchan}");
            }
            let text = std::fs::read_to_string(&r.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(60)..] {
                let _ = writeln!(out, "    | {l}");
            }
        }
        out
    }

    /// Kills every process started by the shim (synchronously) and stops its tasks.
    pub fn shutdown(&self) {
        self.task.abort();
        let handles: Vec<PodHandle> = lock(&self.shared.pods).drain().map(|(_, h)| h).collect();
        for h in &handles {
            h.stop.send_replace(Stop::Terminate { delete_pod: false });
        }
        kill_records(&self.shared, |_| true);
        for h in handles {
            h.task.abort();
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// SIGKILLs the process groups of matching running records.
fn kill_records(shared: &Shared, pred: impl Fn(&ProcRecord) -> bool) {
    for r in lock(&shared.procs).values_mut() {
        if r.running && pred(r) {
            if let Some(pid) = r.pid {
                kill_group(pid, libc::SIGKILL);
            }
            r.running = false;
        }
    }
}

fn kill_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

async fn run(shared: Arc<Shared>, mut rescan_rx: mpsc::UnboundedReceiver<String>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted: Option<HashSet<String>> = None;
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                None => return,
                Some(Err(e)) => eprintln!("node shim: pod watch error (retrying): {e}"),
                Some(Ok(Event::Init)) => relisted = Some(HashSet::new()),
                Some(Ok(Event::InitApply(pod))) => {
                    if let (Some(seen), Some(uid)) = (relisted.as_mut(), pod.metadata.uid.as_ref()) {
                        seen.insert(uid.clone());
                    }
                    on_pod(&shared, pod);
                }
                Some(Ok(Event::InitDone)) => {
                    // Pods deleted while the watch was down send no Delete event.
                    if let Some(seen) = relisted.take() {
                        let gone: Vec<String> = lock(&shared.pods)
                            .keys()
                            .filter(|u| !seen.contains(*u))
                            .cloned()
                            .collect();
                        for uid in gone {
                            on_pod_gone(&shared, &uid);
                        }
                    }
                }
                Some(Ok(Event::Apply(pod))) => on_pod(&shared, pod),
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.as_ref() {
                        on_pod_gone(&shared, uid);
                    }
                }
            },
            Some(node) = rescan_rx.recv() => {
                let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
                match api.list(&lp).await {
                    Ok(list) => list.items.into_iter().for_each(|p| on_pod(&shared, p)),
                    Err(e) => eprintln!("node shim: listing pods of {node}: {e}"),
                }
            }
        }
    }
}

fn on_pod(shared: &Arc<Shared>, pod: Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return;
    };
    let Some(node) = lock(&shared.nodes).get(&node_name).cloned() else {
        return;
    };
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let mut pods = lock(&shared.pods);
    if let Some(h) = pods.get(&uid) {
        if deleting {
            h.stop.send_replace(Stop::Terminate { delete_pod: true });
        }
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !deleting && matches!(phase, Some("Succeeded" | "Failed")) {
        return;
    }
    let initial = if deleting {
        Stop::Terminate { delete_pod: true }
    } else {
        Stop::No
    };
    let (stop, stop_rx) = watch::channel(initial);
    let task = tokio::spawn(run_pod(shared.clone(), pod, node, stop_rx));
    pods.insert(
        uid,
        PodHandle {
            node: node_name,
            stop,
            task,
        },
    );
}

fn on_pod_gone(shared: &Shared, uid: &str) {
    if let Some(h) = lock(&shared.pods).remove(uid) {
        h.stop.send_replace(Stop::Terminate { delete_pod: false });
    }
}

/// Waits until a stop is requested (or the sender is gone), returning the request.
async fn stopped(rx: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let v = *rx.borrow_and_update();
        if v != Stop::No {
            return v;
        }
        if rx.changed().await.is_err() {
            return Stop::Terminate { delete_pod: false };
        }
    }
}

fn is_nodetune_image(image: Option<&str>) -> bool {
    let image = image.unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    last.starts_with("nodetune")
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn append_log(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "[shim {}] {line}", Timestamp::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodetune_images() {
        assert!(is_nodetune_image(Some("ghcr.io/nodetune/nodetune:0.1.0")));
        assert!(is_nodetune_image(Some("nodetune-agent")));
        assert!(!is_nodetune_image(Some("nodetune/busybox")));
    }
}
