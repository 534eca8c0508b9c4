//! One container of a nodetune image: the locally built binary run in the node's network
//! namespace, restarted with capped exponential backoff like the kubelet does.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::pod::{CEvent, CEvents, CState, PodCtx};
use super::spec::{config_map_mounts, expand, host_mounts, map_path, resolve_env};
use super::{ProcRecord, Shared, Stop, append_log, kill_group, lock, now, stopped};

/// The process a container runs, as the container would see it.
struct Launch {
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

/// How one run of the process ended.
enum RunEnd {
    /// It exited by itself (or could not start): exit code and reason.
    Exited {
        code: i32,
        reason: String,
        started_at: Time,
        ran: Duration,
    },
    /// The pod was stopped; the process was terminated and that was reported.
    Stopped,
}

/// Sends one container's state changes to its pod task.
struct Reporter<'a> {
    idx: usize,
    tx: &'a CEvents,
}

impl Reporter<'_> {
    fn send(&self, s: CState) {
        let _ = self.tx.send((self.idx, CEvent::State(s)));
    }
}

pub(super) async fn run_container(
    shared: &Shared,
    ctx: &PodCtx,
    pod: &Pod,
    c: &Container,
    idx: usize,
    stop: &mut watch::Receiver<Stop>,
    tx: &CEvents,
) {
    let report = Reporter { idx, tx };
    let Some(launch) = prepare(shared, ctx, pod, c, stop, &report).await else {
        return;
    };
    // A kubelet updates projected ConfigMaps of running pods on its periodic sync; so does
    // the shim, for as long as this container runs (aborted when this function returns).
    let _refresh = AbortOnDrop(tokio::spawn(super::spec::refresh_config_maps(
        shared.client.clone(),
        pod.clone(),
        c.clone(),
        ctx.node.clone(),
    )));
    let key = (ctx.uid.clone(), c.name.clone());
    lock(&shared.procs).insert(
        key.clone(),
        ProcRecord {
            namespace: ctx.namespace.clone(),
            pod: ctx.name.clone(),
            uid: ctx.uid.clone(),
            container: c.name.clone(),
            node: ctx.node.name.clone(),
            netns: ctx.node.netns.clone(),
            args: launch.args.clone(),
            env: launch.env.clone(),
            log: launch.log.clone(),
            kubeconfig: ctx.kubeconfig.clone(),
            ..ProcRecord::default()
        },
    );

    let mut restarts: u32 = 0;
    // The product's own capped exponential backoff (nodetune::backoff), as the kubelet's.
    let mut backoff =
        nodetune::backoff::Backoff::new(shared.cfg.backoff_base, shared.cfg.backoff_cap);
    let mut delay = backoff.next_delay();
    let mut last_state = json!({});
    while *stop.borrow() == Stop::No {
        let end = run_once(
            shared,
            ctx,
            &launch,
            &key,
            stop,
            &report,
            restarts,
            &last_state,
        )
        .await;
        let RunEnd::Exited {
            code,
            reason,
            started_at,
            ran,
        } = end
        else {
            return;
        };
        append_log(
            &launch.log,
            &format!("exited: {code} ({reason}) after {ran:?}"),
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
            report.send(CState {
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
        if ran > shared.cfg.backoff_cap * 2 {
            backoff.reset();
            delay = backoff.next_delay();
        }
        last_state = terminated;
        report.send(CState {
            state: json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {delay:?} restarting failed container")}}),
            last_state: last_state.clone(),
            restarts,
            ready: false,
            started: false,
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(stop) => return,
        }
        delay = backoff.next_delay();
        restarts += 1;
    }
}

/// Environment and arguments, resolved like the kubelet does (retried while a referenced
/// ConfigMap or Secret is missing); `None` when the pod is stopped first.
async fn prepare(
    shared: &Shared,
    ctx: &PodCtx,
    pod: &Pod,
    c: &Container,
    stop: &mut watch::Receiver<Stop>,
    report: &Reporter<'_>,
) -> Option<Launch> {
    let log = ctx.dir.join(format!("{}.log", c.name));
    let env = loop {
        match resolve_env(&shared.client, pod, c, &ctx.node).await {
            Ok(env) => break env,
            Err(e) => {
                append_log(
                    &log,
                    &format!("cannot resolve environment (retrying): {e:#}"),
                );
                report.send(CState {
                    state: json!({"waiting": {"reason": "CreateContainerConfigError", "message": format!("{e:#}")}}),
                    ..CState::creating()
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stopped(stop) => return None,
                }
            }
        }
    };
    let mut mounts = host_mounts(pod, c, &ctx.node);
    let projected = loop {
        match config_map_mounts(&shared.client, pod, c, &ctx.node).await {
            Ok(m) => break m,
            Err(e) => {
                // A kubelet keeps the container waiting until the volume can be set up.
                append_log(
                    &log,
                    &format!("cannot set up a configMap volume (retrying): {e:#}"),
                );
                report.send(CState {
                    state: json!({"waiting": {"reason": "ContainerCreating", "message": format!("{e:#}")}}),
                    ..CState::creating()
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stopped(stop) => return None,
                }
            }
        }
    };
    mounts.extend(projected);
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, map_path(&v, &mounts)))
        .collect();
    if let Some(kc) = &ctx.kubeconfig {
        env.push(("KUBECONFIG".into(), kc.display().to_string()));
    }
    let (bin, args) = argv(c, &env, &shared.cfg.agent_bin);
    let args = args.iter().map(|a| map_path(a, &mounts)).collect();
    Some(Launch {
        bin,
        args,
        env,
        log,
    })
}

/// Starts the process in the node's namespace and waits for it to exit or for the pod to
/// stop (then terminates it within the grace period).
#[allow(clippy::too_many_arguments)]
async fn run_once(
    shared: &Shared,
    ctx: &PodCtx,
    launch: &Launch,
    key: &(String, String),
    stop: &mut watch::Receiver<Stop>,
    report: &Reporter<'_>,
    restarts: u32,
    last_state: &Value,
) -> RunEnd {
    let log = &launch.log;
    append_log(
        log,
        &format!(
            "starting in netns {}: {} {:?}",
            ctx.node.netns,
            launch.bin.display(),
            launch.args
        ),
    );
    let started_at = now();
    let started = Instant::now();
    let exited = |code, reason: String| RunEnd::Exited {
        code,
        reason,
        started_at: started_at.clone(),
        ran: started.elapsed(),
    };
    let mut child = match spawn(ctx, launch) {
        Ok(child) => child,
        Err(e) => {
            append_log(log, &format!("start failed: {e}"));
            return exited(128, "StartError".to_string());
        }
    };
    let pid = child.id();
    update_record(shared, key, |r| {
        r.pid = pid;
        r.running = true;
        r.starts += 1;
    });
    report.send(CState {
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
            append_log(log, &format!("stopped: exit {code} ({reason})"));
            update_record(shared, key, |r| {
                r.running = false;
                r.last_exit = Some(format!("{code} ({reason}), stopped"));
            });
            report.send(CState {
                state: json!({"terminated": {"exitCode": code, "reason": reason,
                               "startedAt": started_at, "finishedAt": now()}}),
                last_state: last_state.clone(),
                restarts,
                ready: false,
                started: false,
            });
            return RunEnd::Stopped;
        }
    };
    let (code, reason) = match status {
        Ok(st) => exit_description(&st),
        Err(e) => {
            append_log(log, &format!("wait failed: {e}"));
            (255, "Error".to_string())
        }
    };
    exited(code, reason)
}

/// `ip netns exec NS BIN ARGS` in its own process group, output appended to the log.
fn spawn(ctx: &PodCtx, launch: &Launch) -> std::io::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ctx.node.netns])
        .arg(&launch.bin)
        .args(&launch.args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("HOSTNAME", &ctx.name)
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&ctx.node.root)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
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

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
