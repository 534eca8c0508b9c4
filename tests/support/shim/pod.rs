//! One pod on a simulated node: its credentials, a task per container, status patches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::container::run_container;
use super::{Shared, ShimNode, Stop, append_log, is_nodetune_image, now, stopped};

/// One container's state as reported in containerStatuses.
#[derive(Clone, Debug)]
pub(super) struct CState {
    pub(super) state: Value,
    pub(super) last_state: Value,
    pub(super) restarts: u32,
    pub(super) ready: bool,
    pub(super) started: bool,
}

impl CState {
    pub(super) fn creating() -> CState {
        CState {
            state: json!({"waiting": {"reason": "ContainerCreating"}}),
            last_state: json!({}),
            restarts: 0,
            ready: false,
            started: false,
        }
    }
}

/// What a container task tells its pod task.
pub(super) enum CEvent {
    State(CState),
    Done,
}

/// What every container of a pod shares.
pub(super) struct PodCtx {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) node: ShimNode,
    /// Per-pod directory: container logs, kubeconfig, token.
    pub(super) dir: PathBuf,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) restart_policy: String,
    pub(super) grace: Duration,
    /// ServiceAccount whose token the pod's kubeconfig carries.
    service_account: String,
}

/// Channel from container tasks to the pod task: (container index, event).
pub(super) type CEvents = mpsc::UnboundedSender<(usize, CEvent)>;

impl PodCtx {
    fn new(shared: &Shared, pod: &Pod, node: ShimNode) -> PodCtx {
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
        let grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 3600)
                .unsigned_abs(),
        )
        .min(shared.cfg.max_grace);
        PodCtx {
            namespace,
            name,
            uid,
            node,
            dir,
            kubeconfig: None,
            restart_policy: spec.restart_policy.unwrap_or_else(|| "Always".into()),
            grace,
            service_account: spec
                .service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        }
    }

    fn shim_log(&self, line: &str) {
        append_log(&self.dir.join("shim.log"), line);
    }
}

/// Runs one pod until it is stopped: credentials, one task per container, status patches,
/// and the final delete of a pod that was being deleted.
pub(super) async fn run_pod(
    shared: Arc<Shared>,
    pod: Pod,
    node: ShimNode,
    mut stop_rx: watch::Receiver<Stop>,
) {
    let mut ctx = PodCtx::new(&shared, &pod, node);
    if let Err(e) = std::fs::create_dir_all(&ctx.dir) {
        eprintln!("node shim: {}: {e}", ctx.dir.display());
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let needs_agent = spec
        .containers
        .iter()
        .any(|c| is_nodetune_image(c.image.as_deref()));
    let automount = spec.automount_service_account_token != Some(false);
    if needs_agent && automount && *stop_rx.borrow() == Stop::No {
        ctx.kubeconfig = first_credentials(&shared, &ctx, stop_rx.clone()).await;
    }
    let ctx = Arc::new(ctx);
    let rx = spawn_containers(&shared, &ctx, &pod, &stop_rx);
    report_status(&shared, &ctx, &spec.containers, rx, &stop_rx).await;

    // All containers stopped. A pod being deleted is now finished: delete it for good.
    if stopped(&mut stop_rx).await == (Stop::Terminate { delete_pod: true }) {
        delete_for_good(&shared, &ctx).await;
    }
}

/// A pod-bound ServiceAccount token and the kubeconfig holding it, retried until it works
/// or the pod is stopped (`None`).
async fn first_credentials(
    shared: &Shared,
    ctx: &PodCtx,
    mut stop: watch::Receiver<Stop>,
) -> Option<PathBuf> {
    let wanted = async {
        let mut delay = Duration::from_millis(200);
        loop {
            match write_credentials(shared, ctx).await {
                Ok(path) => break path,
                Err(e) => {
                    ctx.shim_log(&format!("token request failed: {e:#}"));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    };
    tokio::select! {
        path = wanted => Some(path),
        _ = stopped(&mut stop) => None,
    }
}

/// One task per container: nodetune containers run the binary, others only pretend.
fn spawn_containers(
    shared: &Arc<Shared>,
    ctx: &Arc<PodCtx>,
    pod: &Pod,
    stop_rx: &watch::Receiver<Stop>,
) -> mpsc::UnboundedReceiver<(usize, CEvent)> {
    let (tx, rx) = mpsc::unbounded_channel::<(usize, CEvent)>();
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    for (idx, c) in containers.into_iter().enumerate() {
        let tx = tx.clone();
        let mut stop = stop_rx.clone();
        if is_nodetune_image(c.image.as_deref()) {
            let (shared, ctx, pod) = (shared.clone(), ctx.clone(), pod.clone());
            tokio::spawn(async move {
                run_container(&shared, &ctx, &pod, &c, idx, &mut stop, &tx).await;
                let _ = tx.send((idx, CEvent::Done));
            });
        } else {
            tokio::spawn(async move {
                pretend_container(idx, &mut stop, &tx).await;
                let _ = tx.send((idx, CEvent::Done));
            });
        }
    }
    rx
}

/// A container of another image: reported running and ready until the pod stops.
async fn pretend_container(idx: usize, stop: &mut watch::Receiver<Stop>, tx: &CEvents) {
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
    stopped(stop).await;
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
}

/// Patches pod status on every container change and refreshes the token at 80 % of its
/// lifetime, until every container task is done.
async fn report_status(
    shared: &Shared,
    ctx: &PodCtx,
    containers: &[Container],
    mut rx: mpsc::UnboundedReceiver<(usize, CEvent)>,
    stop_rx: &watch::Receiver<Stop>,
) {
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ctx.namespace);
    let mut states: Vec<CState> = containers.iter().map(|_| CState::creating()).collect();
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
                let CEvent::State(s) = ev else {
                    live -= 1;
                    continue;
                };
                if let Some(slot) = states.get_mut(idx) {
                    *slot = s;
                }
                let ready = states.iter().all(|s| s.ready);
                if ready != was_ready {
                    was_ready = ready;
                    ready_since = now();
                }
                let phase = pod_phase(&ctx.restart_policy, &states);
                let patch = status_patch(containers, &states, &ctx.node, &start_time, ready, &ready_since, phase);
                if let Err(e) = pods.patch_status(&ctx.name, &PatchParams::default(), &Patch::Merge(&patch)).await
                    && *stop_rx.borrow() == Stop::No
                {
                    ctx.shim_log(&format!("status patch failed: {e}"));
                }
            }
            _ = refresh.tick(), if ctx.kubeconfig.is_some() => {
                if let Err(e) = write_credentials(shared, ctx).await {
                    ctx.shim_log(&format!("token refresh failed: {e:#}"));
                }
            }
        }
    }
}

/// Deletes the pod with grace 0 (only this uid), as the kubelet does once its containers
/// are gone; the garbage collector and the DaemonSet controller wait for that.
async fn delete_for_good(shared: &Shared, ctx: &PodCtx) {
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ctx.namespace);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(ctx.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&ctx.name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => ctx.shim_log(&format!("final delete failed: {e}")),
    }
}

/// The phase a kubelet reports: a run-to-completion pod (restartPolicy `Never` or `OnFailure`)
/// whose containers have all terminated for good is `Succeeded` when every one exited 0, else
/// `Failed`; otherwise `Running` once a container started, else `Pending`. Without the first
/// rule a Job never completes (and `helm uninstall` waits for its pre-delete hook until it
/// times out). With `OnFailure` a failed container is restarting, so it is not terminated.
fn pod_phase(restart_policy: &str, states: &[CState]) -> &'static str {
    let exit_code = |s: &CState| {
        s.state
            .pointer("/terminated/exitCode")
            .and_then(Value::as_i64)
    };
    let codes: Option<Vec<i64>> = states.iter().map(exit_code).collect();
    match codes {
        Some(codes) if restart_policy != "Always" && !codes.is_empty() => {
            if codes.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        }
        _ if states.iter().any(|s| s.started || s.restarts > 0) => "Running",
        _ => "Pending",
    }
}

fn status_patch(
    containers: &[Container],
    states: &[CState],
    node: &ShimNode,
    start_time: &Time,
    ready: bool,
    ready_since: &Time,
    phase: &str,
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
    let flag = |b: bool| if b { "True" } else { "False" };
    json!({
        "status": {
            "phase": phase,
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

/// Writes `token` and `kubeconfig` into the pod's directory (a fresh TokenRequest).
async fn write_credentials(shared: &Shared, ctx: &PodCtx) -> anyhow::Result<PathBuf> {
    let (dir, namespace, sa) = (&ctx.dir, &ctx.namespace, &ctx.service_account);
    let (pod, uid) = (&ctx.name, &ctx.uid);
    let api: Api<ServiceAccount> = Api::namespaced(shared.client.clone(), namespace);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(shared.cfg.token_ttl_secs),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.clone()),
                uid: Some(uid.clone()),
            }),
        },
        ..TokenRequest::default()
    };
    let resp = api
        .create_token_request(sa.as_str(), &PostParams::default(), &req)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> CState {
        CState {
            state: json!({"terminated": {"exitCode": code, "reason": "Completed"}}),
            ..CState::creating()
        }
    }

    fn running() -> CState {
        CState {
            state: json!({"running": {}}),
            started: true,
            ..CState::creating()
        }
    }

    /// Issue 17, item 10: run-to-completion pods end Succeeded or Failed by their exit codes.
    #[test]
    fn run_to_completion_pods_end_by_their_exit_codes() {
        assert_eq!(pod_phase("Never", &[exited(0), exited(0)]), "Succeeded");
        assert_eq!(pod_phase("OnFailure", &[exited(0)]), "Succeeded");
        assert_eq!(pod_phase("Never", &[exited(0), exited(3)]), "Failed");
        assert_eq!(pod_phase("Never", &[exited(0), running()]), "Running");
        // A long-running pod's exited container is restarted: never final.
        assert_ne!(pod_phase("Always", &[exited(0)]), "Succeeded");
        assert_eq!(pod_phase("Always", &[running()]), "Running");
        assert_eq!(pod_phase("Never", &[CState::creating()]), "Pending");
    }
}
