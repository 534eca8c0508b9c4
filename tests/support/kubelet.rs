//! Kubelet nodes: containerd and a real kubelet in a node namespace (`tests/cluster/node add
//! --kubelet`), next to simulated nodes in the same cluster, and the images they run.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::cluster::SimNode;
use super::{cluster_prereqs, note_absent, repo_root, skip_or_fail};

/// What `tests/cluster/build` puts in the node bin dir.
pub const NODE_COMPONENTS: &[&str] = &[
    "kubelet",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "pause.tar",
];

/// Directory of the kubelet-node components: `NODETUNE_NODE_BIN` when set, else what
/// `tests/cluster/build --print-node-dir` says.
pub fn node_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NODETUNE_NODE_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let out = Command::new(repo_root().join("tests/cluster/build"))
        .arg("--print-node-dir")
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Like [`cluster_prereqs`], plus the node components and buildah (images). Returns the
/// control-plane bin dir and the node bin dir.
pub fn kubelet_prereqs(test: &str) -> Option<(PathBuf, PathBuf)> {
    let bin = cluster_prereqs(test)?;
    let mut missing = Vec::new();
    let node = node_bin_dir();
    note_absent(
        node.as_deref(),
        "--print-node-dir",
        NODE_COMPONENTS,
        Path::exists,
        &mut missing,
    );
    for (tool, what) in [
        ("runc", "runc (tests/cluster/build installs it)"),
        ("buildah", "buildah (tests/cluster/build installs it)"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            missing.push(what.to_string());
        }
    }
    if missing.is_empty() {
        return Some((bin, node?));
    }
    skip_or_fail(test, "kubelet", &missing);
    None
}

/// A kubelet node: the namespace (as for a simulated node) plus its containerd.
#[derive(Clone, Debug)]
pub struct KubeletNode {
    pub node: SimNode,
    pub containerd_sock: PathBuf,
    /// The kubelet's cgroupRoot (a directory of that name in every cgroup hierarchy).
    pub cgroup: String,
    pub pod_cidr: String,
    /// From `node add` to the Node's Ready=True (measured by the script).
    pub ready_in: Duration,
    pub(super) ctr: PathBuf,
}

impl Deref for KubeletNode {
    type Target = SimNode;
    fn deref(&self) -> &SimNode {
        &self.node
    }
}

impl KubeletNode {
    /// `ctr` against this node's containerd, in the CRI namespace.
    pub fn ctr(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.ctr);
        cmd.arg("-a")
            .arg(&self.containerd_sock)
            .args(["-n", "k8s.io"]);
        cmd
    }

    /// Host pid of a running container's main process, found through the CRI labels
    /// containerd keeps (`None` while it is not running).
    pub async fn container_pid(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> anyhow::Result<Option<u32>> {
        let filter = format!(
            "labels.\"io.kubernetes.pod.namespace\"=={namespace},labels.\"io.kubernetes.pod.name\"=={pod},labels.\"io.kubernetes.container.name\"=={container}"
        );
        let ids = run_ok(self.ctr().args(["containers", "ls", "-q", &filter])).await?;
        let tasks = run_ok(self.ctr().args(["tasks", "ls"])).await?;
        // `tasks ls`: TASK PID STATUS; only one container of that name runs at a time.
        for line in tasks.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [id, pid, "RUNNING", ..] = f[..]
                && ids.lines().any(|i| i.trim() == id)
            {
                return Ok(pid.parse().ok());
            }
        }
        Ok(None)
    }

    /// The last `lines` lines of every container log the kubelet wrote on this node
    /// (`<podLogsDir>/<ns>_<pod>_<uid>/<container>/<restart>.log`).
    pub fn pod_log_tails(&self, lines: usize) -> String {
        let mut files = Vec::new();
        collect_files(&self.pod_logs_dir(), &mut files);
        files.sort();
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {} -----\n", f.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The kubelet's podLogsDir (beside the containerd socket's directory).
    pub fn pod_logs_dir(&self) -> PathBuf {
        self.containerd_sock
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("pod-logs"))
            .unwrap_or_default()
    }

    /// Resident memory of everything this node runs, by command name (KiB): the kubelet,
    /// containerd and shims (in the node's namespace) and the containers (in its cgroups).
    pub fn memory_kib(&self) -> BTreeMap<String, u64> {
        let mut pids: Vec<u32> = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let pids_root = Path::new("/sys/fs/cgroup/pids").join(&self.cgroup);
        collect_cgroup_pids(&pids_root, &mut pids);
        pids.sort_unstable();
        pids.dedup();
        let mut out = BTreeMap::new();
        for pid in pids {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            let name = field("Name:").unwrap_or_default();
            let rss: u64 = field("VmRSS:")
                .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            *out.entry(name).or_insert(0) += rss;
        }
        out
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => collect_files(&e.path(), out),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
}

fn collect_cgroup_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_pids(&e.path(), out);
            }
        }
    }
}

async fn run_ok(cmd: &mut tokio::process::Command) -> anyhow::Result<String> {
    let out = cmd.output().await.context("spawn")?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.as_std(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A nodetune image as an archive for `ctr images import`, and the name it carries.
#[derive(Clone, Debug)]
pub struct ImageArchive {
    pub archive: PathBuf,
    pub tag: String,
}

/// The nodetune image under test, named [`nodetune::controller::config::DEFAULT_AGENT_IMAGE`]
/// (what the controller and the deploy/ manifests ask for).
///
/// `NODETUNE_IMAGE_ARCHIVE` when it names a file (scripts/test sets it to the archive it just
/// built); else the project's `scripts/image` when the repository has it (the shipped image: static
/// release build, `FROM scratch`, OCI archive; the release build takes minutes the first
/// time) unless `NODETUNE_DEV_IMAGE=1`; otherwise a dev image of the test build, see
/// [`dev_image`].
pub async fn nodetune_image(agent_bin: &Path, out: &Path) -> anyhow::Result<ImageArchive> {
    let tag = nodetune::controller::config::DEFAULT_AGENT_IMAGE.to_string();
    // scripts/test builds the image first and names the archive here.
    if let Some(archive) = std::env::var_os("NODETUNE_IMAGE_ARCHIVE").map(PathBuf::from)
        && archive.is_file()
    {
        return Ok(ImageArchive { archive, tag });
    }
    let script = repo_root().join("scripts/image");
    let dev = std::env::var("NODETUNE_DEV_IMAGE").is_ok_and(|v| !v.is_empty() && v != "0");
    if script.is_file() && !dev {
        let stdout = run_ok(tokio::process::Command::new(&script).current_dir(repo_root()))
            .await
            .context("scripts/image")?;
        let last = stdout.lines().last().unwrap_or_default().trim();
        let archive = repo_root().join(last);
        if last.is_empty() || !archive.is_file() {
            bail!("scripts/image printed no archive path: {stdout:?}");
        }
        return Ok(ImageArchive { archive, tag });
    }
    let archive = dev_image(agent_bin, &tag, out).await?;
    Ok(ImageArchive { archive, tag })
}

/// A dev image (docker-archive tagged `tag`): `FROM scratch` with the test build of the
/// binary and the shared libraries `ldd` lists, so it runs the code under test; no USER
/// (root), like an image whose pod specs say who runs it. Built in a throwaway buildah store.
pub async fn dev_image(agent_bin: &Path, tag: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let archive = out.join("nodetune-image.tar");
    let ctx = out.join("image-context");
    std::fs::create_dir_all(&ctx).context("image context dir")?;
    std::fs::copy(agent_bin, ctx.join("nodetune")).context("copy binary")?;
    let ldd = Command::new("ldd").arg(agent_bin).output().context("ldd")?;
    let mut copies = String::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let rel = p.trim_start_matches('/');
            let dest = ctx.join("rootfs").join(rel);
            std::fs::create_dir_all(dest.parent().context("lib path")?)?;
            std::fs::copy(p, &dest).with_context(|| format!("copy {p}"))?;
            copies.push_str(&format!("COPY rootfs/{rel} /{rel}\n"));
        }
    }
    std::fs::write(
        ctx.join("Containerfile"),
        format!(
            // No USER: the agent needs root; the controller's pod spec asks for non-root.
            "FROM scratch\nCOPY nodetune /nodetune\n{copies}ENTRYPOINT [\"/nodetune\"]\n"
        ),
    )?;
    let store = out.join("buildah");
    let buildah = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("buildah");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        cmd
    };
    let ctx_s = ctx.to_string_lossy().into_owned();
    let file_s = ctx.join("Containerfile").to_string_lossy().into_owned();
    run_ok(&mut buildah(&[
        "bud", "--quiet", "-f", &file_s, "-t", tag, &ctx_s,
    ]))
    .await?;
    let dest = format!("docker-archive:{}:{tag}", archive.display());
    run_ok(&mut buildah(&["push", "--quiet", tag, &dest])).await?;
    let _ = run_ok(&mut buildah(&["rmi", "--all"])).await;
    let _ = std::fs::remove_dir_all(&store);
    Ok(archive)
}

/// A directory removed on drop unless it existed before: the agents' hostPath state directory
/// is this machine's own path on kubelet nodes, so a test leaves it as it found it (also
/// after a failure).
pub struct RemoveIfNew(Option<PathBuf>);

impl RemoveIfNew {
    pub fn new(path: &str) -> Self {
        let p = PathBuf::from(path);
        Self((!p.exists()).then_some(p))
    }
}

impl Drop for RemoveIfNew {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A control plane for a kubelet-node test, with the agents' state directory guarded; `None`
/// when the test is to be skipped (see [`kubelet_prereqs`]).
pub async fn kubelet_cluster(test: &str) -> anyhow::Result<Option<(super::Cluster, RemoveIfNew)>> {
    let Some((bin, _node_bin)) = kubelet_prereqs(test) else {
        return Ok(None);
    };
    let state_dir = RemoveIfNew::new(nodetune::sysctl::DEFAULT_STATE_DIR);
    Ok(Some((super::Cluster::start(&bin).await?, state_dir)))
}
