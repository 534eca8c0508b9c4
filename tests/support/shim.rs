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
//! Not emulated: other volume types, probes, init containers, resource limits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

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

/// One container's state as reported in containerStatuses.
#[derive(Clone, Debug)]
struct CState {
    state: Value,
    last_state: Value,
    restarts: u32,
    ready: bool,
    started: bool,
}

impl CState {
    fn creating() -> CState {
        CState {
            state: json!({"waiting": {"reason": "ContainerCreating"}}),
            last_state: json!({}),
            restarts: 0,
            ready: false,
            started: false,
        }
    }
}

enum CEvent {
    State(CState),
    Done,
}

struct PodCtx {
    namespace: String,
    name: String,
    uid: String,
    node: ShimNode,
    dir: PathBuf,
    kubeconfig: Option<PathBuf>,
    restart_policy: String,
    grace: Duration,
}

async fn run_pod(
    shared: Arc<Shared>,
    pod: Pod,
    node: ShimNode,
    mut stop_rx: watch::Receiver<Stop>,
) {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let short_uid: String = uid.chars().take(8).collect();
    let dir = shared
        .cfg
        .pods_dir
        .join(format!("{namespace}_{name}_{short_uid}"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("node shim: {}: {e}", dir.display());
    }
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let grace = Duration::from_secs(
        spec.termination_grace_period_seconds
            .unwrap_or(30)
            .clamp(0, 3600)
            .unsigned_abs(),
    )
    .min(shared.cfg.max_grace);

    // Credentials first: a pod-bound ServiceAccount token, refreshed below.
    let needs_agent = spec
        .containers
        .iter()
        .any(|c| is_nodetune_image(c.image.as_deref()));
    let automount = spec.automount_service_account_token != Some(false);
    let sa = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let mut kubeconfig = None;
    if needs_agent && automount && *stop_rx.borrow() == Stop::No {
        let wanted = async {
            let mut delay = Duration::from_millis(200);
            loop {
                match write_credentials(&shared, &dir, &namespace, &sa, &name, &uid).await {
                    Ok(path) => break path,
                    Err(e) => {
                        append_log(
                            &dir.join("shim.log"),
                            &format!("token request failed: {e:#}"),
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        };
        let mut stop_watch = stop_rx.clone();
        tokio::select! {
            path = wanted => kubeconfig = Some(path),
            _ = stopped(&mut stop_watch) => {}
        }
    }

    let ctx = Arc::new(PodCtx {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: uid.clone(),
        node: node.clone(),
        dir: dir.clone(),
        kubeconfig: kubeconfig.clone(),
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        grace,
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, CEvent)>();
    let mut states: Vec<CState> = spec.containers.iter().map(|_| CState::creating()).collect();
    for (idx, c) in spec.containers.iter().enumerate() {
        let tx = tx.clone();
        let mut stop = stop_rx.clone();
        if is_nodetune_image(c.image.as_deref()) {
            let (shared, ctx, pod, c) = (shared.clone(), ctx.clone(), pod.clone(), c.clone());
            tokio::spawn(async move {
                run_container(&shared, &ctx, &pod, &c, idx, &mut stop, &tx).await;
                let _ = tx.send((idx, CEvent::Done));
            });
        } else {
            tokio::spawn(async move {
                let started = now();
                let _ = tx.send((
                    idx,
                    CEvent::State(CState {
                        state: json!({"running": {"startedAt": started}}),
                        last_state: json!({}),
                        restarts: 0,
                        ready: true,
                        started: true,
                    }),
                ));
                stopped(&mut stop).await;
                let _ = tx.send((
                    idx,
                    CEvent::State(CState {
                        state: json!({"terminated": {"exitCode": 0, "reason": "Completed",
                                       "startedAt": started, "finishedAt": now()}}),
                        last_state: json!({}),
                        restarts: 0,
                        ready: false,
                        started: false,
                    }),
                ));
                let _ = tx.send((idx, CEvent::Done));
            });
        }
    }
    drop(tx);

    let start_time = now();
    let mut ready_since = now();
    let mut was_ready = false;
    let refresh_every =
        Duration::from_secs((shared.cfg.token_ttl_secs.max(600) * 4 / 5).unsigned_abs());
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
    let mut live = states.len();
    while live > 0 {
        tokio::select! {
            msg = rx.recv() => {
                let Some((idx, ev)) = msg else { break };
                match ev {
                    CEvent::Done => live -= 1,
                    CEvent::State(s) => {
                        if let Some(slot) = states.get_mut(idx) {
                            *slot = s;
                        }
                        let ready = states.iter().all(|s| s.ready);
                        if ready != was_ready {
                            was_ready = ready;
                            ready_since = now();
                        }
                        let patch = status_patch(&spec.containers, &states, &node, &start_time, ready, &ready_since);
                        if let Err(e) = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await
                            && *stop_rx.borrow() == Stop::No
                        {
                            append_log(&dir.join("shim.log"), &format!("status patch failed: {e}"));
                        }
                    }
                }
            }
            _ = refresh.tick(), if kubeconfig.is_some() => {
                if let Err(e) = write_credentials(&shared, &dir, &namespace, &sa, &name, &uid).await {
                    append_log(&dir.join("shim.log"), &format!("token refresh failed: {e:#}"));
                }
            }
        }
    }

    // All containers stopped. A pod being deleted is now finished: delete it for good.
    if stopped(&mut stop_rx).await == (Stop::Terminate { delete_pod: true }) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => append_log(&dir.join("shim.log"), &format!("final delete failed: {e}")),
        }
    }
}

fn status_patch(
    containers: &[Container],
    states: &[CState],
    node: &ShimNode,
    start_time: &Time,
    ready: bool,
    ready_since: &Time,
) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .zip(states)
        .map(|(c, s)| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("nodetune-shim://{image}"),
                "containerID": format!("nodetune-shim://{}-{}", c.name, s.restarts),
                "ready": s.ready,
                "started": s.started,
                "restartCount": s.restarts,
                "state": s.state,
                "lastState": s.last_state,
            })
        })
        .collect();
    let any_started = states.iter().any(|s| s.started || s.restarts > 0);
    let flag = |b: bool| if b { "True" } else { "False" };
    json!({
        "status": {
            "phase": if any_started { "Running" } else { "Pending" },
            "hostIP": node.ip,
            "hostIPs": [{"ip": node.ip}],
            "podIP": node.ip,
            "podIPs": [{"ip": node.ip}],
            "startTime": start_time,
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": start_time},
                {"type": "Initialized", "status": "True", "lastTransitionTime": start_time},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": start_time},
                {"type": "ContainersReady", "status": flag(ready), "lastTransitionTime": ready_since},
                {"type": "Ready", "status": flag(ready), "lastTransitionTime": ready_since},
            ],
            "containerStatuses": statuses,
        }
    })
}

async fn write_credentials(
    shared: &Shared,
    dir: &Path,
    namespace: &str,
    sa: &str,
    pod: &str,
    uid: &str,
) -> anyhow::Result<PathBuf> {
    let api: Api<ServiceAccount> = Api::namespaced(shared.client.clone(), namespace);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(shared.cfg.token_ttl_secs),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
            }),
        },
        ..TokenRequest::default()
    };
    let resp = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("TokenRequest for serviceaccount {namespace}/{sa}"))?;
    let token = resp
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("TokenRequest returned no token")?;
    let token_file = dir.join("token");
    let tmp = dir.join("token.tmp");
    std::fs::write(&tmp, token).context("write token")?;
    std::fs::rename(&tmp, &token_file).context("rename token")?;
    let kubeconfig = dir.join("kubeconfig");
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": shared.cfg.server,
            "certificate-authority": shared.cfg.ca_file,
        }}],
        "users": [{"name": "serviceaccount", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster", "user": "serviceaccount", "namespace": namespace,
        }}],
        "current-context": "in-cluster",
    });
    std::fs::write(&kubeconfig, serde_json::to_vec_pretty(&doc)?).context("write kubeconfig")?;
    Ok(kubeconfig)
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

/// Resolves a container's environment like the kubelet does (the subset tests use).
async fn resolve_env(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    node: &ShimNode,
) -> anyhow::Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(k2, _)| *k2 != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get(&r.name)
                .await
            {
                Ok(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                Err(_) if r.optional == Some(true) => {}
                Err(e) => return Err(e).with_context(|| format!("envFrom configmap {}", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            match Api::<Secret>::namespaced(client.clone(), ns)
                .get(&r.name)
                .await
            {
                Ok(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                Err(_) if r.optional == Some(true) => {}
                Err(e) => return Err(e).with_context(|| format!("envFrom secret {}", r.name)),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_value(pod, node, &f.field_path).with_context(|| {
                    format!("env {}: unsupported fieldRef {}", e.name, f.field_path)
                })?
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
                    .get_opt(&r.name)
                    .await?;
                match cm
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => anyhow::bail!(
                        "env {}: configmap key {}/{} not found",
                        e.name,
                        r.name,
                        r.key
                    ),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let s = Api::<Secret>::namespaced(client.clone(), ns)
                    .get_opt(&r.name)
                    .await?;
                match s.and_then(|s| s.data).and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        anyhow::bail!("env {}: secret key {}/{} not found", e.name, r.name, r.key)
                    }
                }
            } else {
                // resourceFieldRef and others: not emulated.
                continue;
            }
        } else {
            String::new()
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

fn field_value(pod: &Pod, node: &ShimNode, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let key_in = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => Some(node.name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => {
            Some(node.ip.clone())
        }
        _ => key_in("metadata.labels['", &meta.labels)
            .or_else(|| key_in("metadata.annotations['", &meta.annotations)),
    }
}

/// `$(VAR)` expansion as the kubelet does for env values, command and args; `$$` escapes.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// (mountPath, host path) pairs for hostPath volume mounts, longest mountPath first.
fn host_mounts(pod: &Pod, c: &Container, node: &ShimNode) -> Vec<(String, PathBuf)> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(hp) = volumes
            .iter()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref())
        else {
            continue;
        };
        let real = ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| hp.path == *p || hp.path.starts_with(&format!("{p}/")));
        let mut target = if real {
            PathBuf::from(&hp.path)
        } else {
            node.root.join(hp.path.trim_start_matches('/'))
        };
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            target = target.join(sub);
        }
        if !real {
            let file_like = matches!(
                hp.type_.as_deref(),
                Some("File" | "FileOrCreate" | "Socket" | "CharDevice" | "BlockDevice")
            );
            let dir = if file_like {
                target.parent().map(Path::to_path_buf)
            } else {
                Some(target.clone())
            };
            if let Some(d) = dir {
                let _ = std::fs::create_dir_all(d);
            }
            if hp.type_.as_deref() == Some("FileOrCreate") {
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&target);
            }
        }
        out.push((m.mount_path.trim_end_matches('/').to_string(), target));
    }
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    out
}

/// Rewrites a leading mount path (also after `--flag=`) to its host path.
fn map_path(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let map_one = |v: &str| -> Option<String> {
        mounts.iter().find_map(|(mp, target)| {
            let rest = v.strip_prefix(mp.as_str())?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| format!("{}{rest}", target.display()))
        })
    };
    if let Some(m) = map_one(s) {
        return m;
    }
    if let Some((flag, value)) = s.split_once('=')
        && let Some(m) = map_one(value)
    {
        return format!("{flag}={m}");
    }
    s.to_string()
}

/// Binary and arguments for a container: the agent binary when command[0] is nodetune (or
/// absent: the image's entrypoint is the binary), else command as written.
fn argv(c: &Container, env: &[(String, String)], agent: &Path) -> (PathBuf, Vec<String>) {
    let command: Vec<String> = c.command.iter().flatten().map(|s| expand(s, env)).collect();
    let args: Vec<String> = c.args.iter().flatten().map(|s| expand(s, env)).collect();
    match command.split_first() {
        None => (agent.to_path_buf(), args),
        Some((first, rest))
            if first
                .rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with("nodetune")) =>
        {
            (
                agent.to_path_buf(),
                rest.iter().cloned().chain(args).collect(),
            )
        }
        Some((first, rest)) => (
            PathBuf::from(first),
            rest.iter().cloned().chain(args).collect(),
        ),
    }
}

fn exit_description(status: &std::process::ExitStatus) -> (i32, String) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (0, "Completed".into()),
        (Some(code), _) => (code, "Error".into()),
        (None, Some(sig)) => (128 + sig, format!("Error (signal {sig})")),
        (None, None) => (255, "Error".into()),
    }
}

fn update_record(shared: &Shared, key: &(String, String), f: impl FnOnce(&mut ProcRecord)) {
    if let Some(r) = lock(&shared.procs).get_mut(key) {
        f(r);
    }
}

async fn run_container(
    shared: &Shared,
    ctx: &PodCtx,
    pod: &Pod,
    c: &Container,
    idx: usize,
    stop: &mut watch::Receiver<Stop>,
    tx: &mpsc::UnboundedSender<(usize, CEvent)>,
) {
    let log = ctx.dir.join(format!("{}.log", c.name));
    let key = (ctx.uid.clone(), c.name.clone());
    let send = |s: CState| {
        let _ = tx.send((idx, CEvent::State(s)));
    };
    // Environment and arguments, as the container would see them.
    let env = loop {
        match resolve_env(&shared.client, pod, c, &ctx.node).await {
            Ok(env) => break env,
            Err(e) => {
                append_log(
                    &log,
                    &format!("cannot resolve environment (retrying): {e:#}"),
                );
                send(CState {
                    state: json!({"waiting": {"reason": "CreateContainerConfigError", "message": format!("{e:#}")}}),
                    ..CState::creating()
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stopped(stop) => return,
                }
            }
        }
    };
    let mounts = host_mounts(pod, c, &ctx.node);
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, map_path(&v, &mounts)))
        .collect();
    if let Some(kc) = &ctx.kubeconfig {
        env.push(("KUBECONFIG".into(), kc.display().to_string()));
    }
    let (bin, args) = argv(c, &env, &shared.cfg.agent_bin);
    let args: Vec<String> = args.iter().map(|a| map_path(a, &mounts)).collect();
    lock(&shared.procs).insert(
        key.clone(),
        ProcRecord {
            namespace: ctx.namespace.clone(),
            pod: ctx.name.clone(),
            uid: ctx.uid.clone(),
            container: c.name.clone(),
            node: ctx.node.name.clone(),
            netns: ctx.node.netns.clone(),
            args: args.clone(),
            env: env.clone(),
            log: log.clone(),
            kubeconfig: ctx.kubeconfig.clone(),
            ..ProcRecord::default()
        },
    );

    let mut restarts: u32 = 0;
    let mut backoff = shared.cfg.backoff_base;
    let mut last_state = json!({});
    loop {
        if *stop.borrow() != Stop::No {
            break;
        }
        append_log(
            &log,
            &format!(
                "starting in netns {}: {} {:?}",
                ctx.node.netns,
                bin.display(),
                args
            ),
        );
        let spawned = (|| -> std::io::Result<tokio::process::Child> {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let err = out.try_clone()?;
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", &ctx.node.netns])
                .arg(&bin)
                .args(&args)
                .env_clear()
                .env(
                    "PATH",
                    std::env::var_os("PATH")
                        .unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                )
                .env("HOSTNAME", &ctx.name)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .current_dir(&ctx.node.root)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(true);
            cmd.spawn()
        })();
        let started_at = now();
        let started = Instant::now();
        let (code, reason) = match spawned {
            Err(e) => {
                append_log(&log, &format!("start failed: {e}"));
                (128, "StartError".to_string())
            }
            Ok(mut child) => {
                let pid = child.id();
                update_record(shared, &key, |r| {
                    r.pid = pid;
                    r.running = true;
                    r.starts += 1;
                });
                send(CState {
                    state: json!({"running": {"startedAt": started_at}}),
                    last_state: last_state.clone(),
                    restarts,
                    ready: true,
                    started: true,
                });
                let status = tokio::select! {
                    st = child.wait() => st,
                    _ = stopped(stop) => {
                        let st = terminate(&mut child, pid, ctx.grace).await;
                        let (code, reason) = st.as_ref().map(exit_description).unwrap_or((137, "Error".into()));
                        append_log(&log, &format!("stopped: exit {code} ({reason})"));
                        update_record(shared, &key, |r| {
                            r.running = false;
                            r.last_exit = Some(format!("{code} ({reason}), stopped"));
                        });
                        send(CState {
                            state: json!({"terminated": {"exitCode": code, "reason": reason,
                                           "startedAt": started_at, "finishedAt": now()}}),
                            last_state: last_state.clone(),
                            restarts,
                            ready: false,
                            started: false,
                        });
                        return;
                    }
                };
                match status {
                    Ok(st) => exit_description(&st),
                    Err(e) => {
                        append_log(&log, &format!("wait failed: {e}"));
                        (255, "Error".to_string())
                    }
                }
            }
        };
        append_log(
            &log,
            &format!("exited: {code} ({reason}) after {:?}", started.elapsed()),
        );
        update_record(shared, &key, |r| {
            r.running = false;
            r.last_exit = Some(format!("{code} ({reason})"));
        });
        let terminated = json!({"terminated": {"exitCode": code, "reason": reason,
                                               "startedAt": started_at, "finishedAt": now()}});
        let restart = match ctx.restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            send(CState {
                state: terminated,
                last_state: last_state.clone(),
                restarts,
                ready: false,
                started: false,
            });
            stopped(stop).await;
            return;
        }
        // A process that ran for a while starts the backoff over, as with the kubelet.
        if started.elapsed() > shared.cfg.backoff_cap * 2 {
            backoff = shared.cfg.backoff_base;
        }
        last_state = terminated;
        send(CState {
            state: json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {backoff:?} restarting failed container")}}),
            last_state: last_state.clone(),
            restarts,
            ready: false,
            started: false,
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(stop) => return,
        }
        backoff = (backoff * 2).min(shared.cfg.backoff_cap);
        restarts += 1;
    }
}

/// SIGTERM to the process group, SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = pid {
        kill_group(pid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(st) => st,
        Err(_) => {
            if let Some(pid) = pid {
                kill_group(pid, libc::SIGKILL);
            }
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_vars() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)/$(B)/$$(A)", &env), "x/$(B)/$(A)");
    }

    #[test]
    fn maps_paths() {
        let mounts = vec![(
            "/var/lib/nodetune".to_string(),
            PathBuf::from("/n/root/var/lib/nodetune"),
        )];
        assert_eq!(
            map_path("/var/lib/nodetune/x", &mounts),
            "/n/root/var/lib/nodetune/x"
        );
        assert_eq!(
            map_path("--state=/var/lib/nodetune", &mounts),
            "--state=/n/root/var/lib/nodetune"
        );
        assert_eq!(
            map_path("/var/lib/nodetunex", &mounts),
            "/var/lib/nodetunex"
        );
    }

    #[test]
    fn nodetune_images() {
        assert!(is_nodetune_image(Some("ghcr.io/nodetune/nodetune:0.1.0")));
        assert!(is_nodetune_image(Some("nodetune-agent")));
        assert!(!is_nodetune_image(Some("nodetune/busybox")));
    }
}
