//! A control plane started by `tests/cluster/up`, stopped on drop by `tests/cluster/down`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::kubelet::{KubeletNode, node_bin_dir};
use super::repo_root;
use super::shim::{Shim, ShimConfig, ShimNode};

fn script(name: &str) -> PathBuf {
    repo_root().join("tests/cluster").join(name)
}

/// Parses `KEY=VALUE` lines (what `up` and `node add` write).
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// One running control plane. Dropping it stops the node shim and every process of the
/// cluster and removes its bridge and node namespaces, also when the test panics (the
/// directory with the logs is then kept and its path printed).
pub struct Cluster {
    tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    bin: PathBuf,
    env: HashMap<String, String>,
    client: kube::Client,
    startup: Duration,
    shim: Mutex<Option<Shim>>,
    nodes: Mutex<BTreeMap<String, SimNode>>,
    kubelet_nodes: Mutex<BTreeMap<String, KubeletNode>>,
}

/// A simulated node: a Node object paired with a network namespace.
#[derive(Clone, Debug)]
pub struct SimNode {
    pub name: String,
    /// Name of the network namespace (`ip netns exec <netns> ...`).
    pub netns: String,
    /// The node's address on the cluster bridge (also its InternalIP and pods' hostIP).
    pub ip: String,
    /// Directory standing for the node's filesystem (hostPath volumes land under it).
    pub root: PathBuf,
}

impl SimNode {
    /// Runs a command inside the node's network namespace.
    pub async fn exec<S: AsRef<std::ffi::OsStr>>(&self, cmd: &[S]) -> anyhow::Result<Output> {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .output()
            .await
            .with_context(|| format!("ip netns exec {}", self.netns))?;
        Ok(out)
    }

    /// Runs a command inside the namespace; its stdout, or an error with its stderr.
    pub async fn exec_ok<S: AsRef<std::ffi::OsStr>>(&self, cmd: &[S]) -> anyhow::Result<String> {
        let out = self.exec(cmd).await?;
        if !out.status.success() {
            let shown: Vec<_> = cmd.iter().map(|s| s.as_ref().to_string_lossy()).collect();
            bail!(
                "`{}` in {} failed ({}): {}",
                shown.join(" "),
                self.netns,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Inode of the namespace, to compare with `/proc/<pid>/ns/net` of a process.
    pub fn netns_inode(&self) -> anyhow::Result<u64> {
        let path = Path::new("/run/netns").join(&self.netns);
        Ok(std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino())
    }
}

/// Mount points at or under `dir` in this mount namespace (octal escapes left as they are).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    let prefix = format!("{dir}/");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| *m == dir || m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Inode of a process's network namespace.
pub fn process_netns_inode(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/ns/net");
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

impl Cluster {
    /// Starts a control plane with the binaries in `bin` (see [`super::cluster_prereqs`]).
    pub async fn start(bin: &Path) -> anyhow::Result<Cluster> {
        let tmp = tempfile::Builder::new()
            .prefix("nodetune-cluster.")
            .tempdir()
            .context("temp dir")?;
        let dir = tmp.path().to_path_buf();
        let t0 = Instant::now();
        let out = tokio::process::Command::new(script("up"))
            .arg(&dir)
            .env("NODETUNE_CLUSTER_BIN", bin)
            // The watchdog of `up` runs `down` if this test process dies without dropping.
            .env("NODETUNE_CLUSTER_OWNER_PID", std::process::id().to_string())
            .output()
            .await
            .context("run tests/cluster/up")?;
        let startup = t0.elapsed();
        if !out.status.success() {
            // `up` prints the components' log tails and cleans up by itself on failure.
            bail!(
                "tests/cluster/up failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // From here on a failure must still stop the cluster.
        let setup = async {
            let env_text =
                std::fs::read_to_string(dir.join("cluster.env")).context("read cluster.env")?;
            let client = Self::admin_client(&dir).await?;
            anyhow::Ok((parse_env(&env_text), client))
        };
        let (env, client) = match setup.await {
            Ok(v) => v,
            Err(e) => {
                let _ = Command::new(script("down")).arg(&dir).status();
                return Err(e);
            }
        };
        Ok(Cluster {
            tmp: Some(tmp),
            dir,
            bin: bin.to_path_buf(),
            env,
            client,
            startup,
            shim: Mutex::new(None),
            nodes: Mutex::new(BTreeMap::new()),
            kubelet_nodes: Mutex::new(BTreeMap::new()),
        })
    }

    async fn admin_client(dir: &Path) -> anyhow::Result<kube::Client> {
        let kubeconfig =
            Kubeconfig::read_from(dir.join("kubeconfig")).context("read kubeconfig")?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("kubeconfig")?;
        kube::Client::try_from(config).context("client")
    }

    /// Wall time `up` took (processes started, apiserver ready, default ServiceAccount there).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Admin kubeconfig (token of a system:masters user).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A value of cluster.env (CLUSTER_API_PORT, CLUSTER_NODE_SERVER, CLUSTER_CA, ...).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The apiserver URL as seen from inside node namespaces.
    pub fn node_server(&self) -> &str {
        self.env("CLUSTER_NODE_SERVER").unwrap_or_default()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// `kubectl` (the one built with the control plane) with the admin kubeconfig.
    /// `kubectl apply --dry-run=server -f -` of `yaml`: admission's verdict without storing
    /// anything, as Ok(stdout) or Err(stderr).
    pub async fn dry_run_apply(&self, yaml: &str) -> anyhow::Result<Result<String, String>> {
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = self.kubectl();
        cmd.args(["apply", "--dry-run=server", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("kubectl")?;
        let mut stdin = child.stdin.take().context("kubectl's stdin")?;
        stdin.write_all(yaml.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        Ok(if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        })
    }

    pub fn kubectl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.bin("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// `helm` with the admin kubeconfig and its own config/cache/data dirs in the cluster dir.
    pub fn helm(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.bin("helm"));
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Starts the node shim: pods bound to simulated nodes whose image is nodetune's run
    /// `agent_bin` inside the node's namespace (see [`super::shim`]).
    pub fn start_shim(&self, agent_bin: impl Into<PathBuf>) -> anyhow::Result<()> {
        let cfg = ShimConfig::new(
            agent_bin.into(),
            self.node_server().to_string(),
            self.ca_file(),
            self.dir.join("pods"),
        );
        self.start_shim_with(cfg)
    }

    pub fn start_shim_with(&self, cfg: ShimConfig) -> anyhow::Result<()> {
        let mut guard = self.shim.lock().map_err(|_| anyhow::anyhow!("shim lock"))?;
        if guard.is_some() {
            bail!("shim already started");
        }
        let shim = Shim::start(self.client.clone(), cfg);
        let nodes = self
            .nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("nodes lock"))?;
        for n in nodes.values() {
            shim.register_node(shim_node(n));
        }
        *guard = Some(shim);
        Ok(())
    }

    /// Runs `f` with the shim (panics when it was not started: a test bug).
    pub fn with_shim<T>(&self, f: impl FnOnce(&Shim) -> T) -> T {
        let guard = self.shim.lock().expect("shim lock");
        f(guard.as_ref().expect("start_shim was not called"))
    }

    /// Runs `tests/cluster/node add [--kubelet]`; what it printed.
    async fn node_add(
        &self,
        kubelet: bool,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<HashMap<String, String>> {
        let mut cmd = tokio::process::Command::new(script("node"));
        cmd.arg("add");
        if kubelet {
            cmd.arg("--kubelet");
        }
        let out = cmd
            .args([self.dir.as_os_str(), name.as_ref()])
            .args(labels.iter().map(|(k, v)| format!("{k}={v}")))
            .output()
            .await
            .context("run tests/cluster/node add")?;
        if !out.status.success() {
            bail!(
                "tests/cluster/node add {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(parse_env(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Creates a simulated node (Node object + network namespace) with extra labels.
    pub async fn add_node(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<SimNode> {
        let env = self.node_add(false, name, labels).await?;
        let node = sim_node(name, &env)?;
        self.nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("nodes lock"))?
            .insert(name.to_string(), node.clone());
        if let Some(shim) = self
            .shim
            .lock()
            .map_err(|_| anyhow::anyhow!("shim lock"))?
            .as_ref()
        {
            shim.register_node(shim_node(&node));
        }
        Ok(node)
    }

    /// Starts a kubelet node: containerd and a kubelet in a new node namespace; returns once
    /// the kubelet has registered the Node (with `labels`) and it is Ready. The node shim
    /// leaves its pods alone. Needs the node components of `tests/cluster/build`.
    pub async fn add_kubelet_node(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<KubeletNode> {
        let env = self.node_add(true, name, labels).await?;
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .with_context(|| format!("node add printed no {k}"))
        };
        let ready_ms: u64 =
            std::fs::read_to_string(self.dir.join("nodes").join(name).join("kubelet.env"))
                .ok()
                .and_then(|t| {
                    parse_env(&t)
                        .get("NODE_READY_MS")
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(0);
        let ctr = node_bin_dir().context("node bin dir")?.join("ctr");
        let node = KubeletNode {
            node: sim_node(name, &env)?,
            containerd_sock: PathBuf::from(get("NODE_CONTAINERD_SOCK")?),
            cgroup: get("NODE_CGROUP")?,
            pod_cidr: get("NODE_POD_CIDR")?,
            ready_in: Duration::from_millis(ready_ms),
            ctr,
        };
        self.kubelet_nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("nodes lock"))?
            .insert(name.to_string(), node.clone());
        Ok(node)
    }

    /// Imports image archives (docker or OCI) into a kubelet node's containerd, where pods
    /// with `imagePullPolicy: Never`/`IfNotPresent` find them without a registry.
    pub async fn import_image(&self, node: &str, archives: &[&Path]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(script("node"))
            .args(["import".as_ref(), self.dir.as_os_str(), node.as_ref()])
            .args(archives)
            .output()
            .await
            .context("run tests/cluster/node import")?;
        if !out.status.success() {
            bail!(
                "tests/cluster/node import {node} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn kubelet_node(&self, name: &str) -> Option<KubeletNode> {
        self.kubelet_nodes.lock().ok()?.get(name).cloned()
    }

    /// Deletes a node of either kind: stops what the shim (or the kubelet and containerd)
    /// runs there, deletes the Node object and the namespace; a kubelet node's containers,
    /// mounts and cgroups go too. Pods bound to it are left to the pod garbage collector,
    /// as on a real cluster whose node disappeared.
    pub async fn remove_node(&self, name: &str) -> anyhow::Result<()> {
        self.kubelet_nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("nodes lock"))?
            .remove(name);
        if let Some(shim) = self
            .shim
            .lock()
            .map_err(|_| anyhow::anyhow!("shim lock"))?
            .as_ref()
        {
            shim.unregister_node(name);
        }
        self.nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("nodes lock"))?
            .remove(name);
        let out = tokio::process::Command::new(script("node"))
            .args(["del".as_ref(), self.dir.as_os_str(), name.as_ref()])
            .output()
            .await
            .context("run tests/cluster/node del")?;
        if !out.status.success() {
            bail!(
                "tests/cluster/node del {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<SimNode> {
        self.nodes.lock().ok()?.get(name).cloned()
    }

    /// Merges labels into a Node (a value of `None` removes the label).
    pub async fn label_node(
        &self,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.map_or(serde_json::Value::Null, Into::into)))
            .collect();
        let patch = serde_json::json!({ "metadata": { "labels": labels } });
        Api::<Node>::all(self.client())
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("label node {name}"))?;
        Ok(())
    }

    /// The last `lines` lines of each component's log.
    pub fn component_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) else {
            return out;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {} -----\n", p.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Everything useful after a failure: component log tails and the shim's pod logs.
    pub fn diagnostics(&self) -> String {
        let mut out = self.component_logs(30);
        // TCP connections inside each node: a stuck client shows here.
        let kubelet_nodes: Vec<KubeletNode> = self
            .kubelet_nodes
            .lock()
            .map(|n| n.values().cloned().collect())
            .unwrap_or_default();
        for node in self
            .nodes
            .lock()
            .map(|n| n.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(kubelet_nodes.iter().map(|k| k.node.clone()))
        {
            let ss = Command::new("ip")
                .args(["netns", "exec", &node.netns, "ss", "-tnpo"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.push_str(&format!("----- ss -tnpo in {} -----\n{ss}", node.name));
        }
        // Containers of kubelet nodes, as containerd sees them.
        for k in &kubelet_nodes {
            let tasks = Command::new(&k.ctr)
                .arg("-a")
                .arg(&k.containerd_sock)
                .args(["-n", "k8s.io", "tasks", "ls"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.push_str(&format!("----- ctr tasks ls on {} -----\n{tasks}", k.name));
            out.push_str(&k.pod_log_tails(40));
        }
        if let Ok(guard) = self.shim.lock()
            && let Some(shim) = guard.as_ref()
        {
            out.push_str(&shim.describe());
        }
        out
    }
}

fn sim_node(name: &str, env: &HashMap<String, String>) -> anyhow::Result<SimNode> {
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .with_context(|| format!("node add printed no {k}"))
    };
    Ok(SimNode {
        name: name.to_string(),
        netns: get("NODE_NETNS")?,
        ip: get("NODE_IP")?,
        root: PathBuf::from(get("NODE_ROOT")?),
    })
}

fn shim_node(n: &SimNode) -> ShimNode {
    ShimNode {
        name: n.name.clone(),
        netns: n.netns.clone(),
        ip: n.ip.clone(),
        root: n.root.clone(),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!("{}", self.diagnostics());
        }
        if let Ok(mut guard) = self.shim.lock()
            && let Some(shim) = guard.take()
        {
            shim.shutdown();
        }
        let status = Command::new(script("down"))
            .arg(&self.dir)
            .env("NODETUNE_CLUSTER_QUIET", "1")
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "tests/cluster/down {} failed: {status:?}",
                self.dir.display()
            );
        }
        // Never let the temp dir's recursive delete walk into a mount (a container's
        // rootfs, a pod volume) that `down` could not remove.
        let mounted = mounts_under(&self.dir);
        if !mounted.is_empty() {
            eprintln!(
                "mounts left under {} after down (dir kept): {mounted:?}",
                self.dir.display()
            );
            if let Some(tmp) = self.tmp.take() {
                let _ = tmp.keep();
            }
        }
        if panicking && let Some(tmp) = self.tmp.take() {
            let kept = tmp.keep();
            eprintln!("cluster dir kept for inspection: {}", kept.display());
        }
    }
}
