//! `nodetune agent` flags. The controller renders them into the DaemonSet.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

fn duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The node this agent tunes (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where the ledger of original values lives (a hostPath, so it outlives the pod).
    #[arg(long, env = "NODETUNE_STATE_DIR", default_value = crate::sysctl::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Cluster sysctl policy (YAML or JSON, e.g. a mounted ConfigMap), re-read every pass and
    /// checked for changes every 2 s between passes (a change starts a pass at once). If it
    /// cannot be read or is invalid, nothing new is written until it is fixed.
    #[arg(long, env = "NODETUNE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Tune pods' network namespaces for profiles with `spec.podSelector` or
    /// `spec.namespaceSelector` (`--pod-targeting=false` turns it off: such profiles are then
    /// applied nowhere, and never to the host). Chart value `agent.podTargeting.enabled`.
    #[arg(long, env = "NODETUNE_POD_TARGETING", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_targeting: bool,
    /// How often to re-read the keys (re-applying drift) and count TCP sockets.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub interval: Duration,
    /// Longest time between two report writes when nothing but TCP counts changed.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub heartbeat: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:9477")]
    pub metrics_addr: SocketAddr,
    /// Count TCP sockets in the network namespaces of the node's pods (needs hostPID, and
    /// CAP_SYS_ADMIN for setns). Off: the report has no `pods`.
    #[arg(long, env = "NODETUNE_POD_COUNTING", default_value_t = false, action = clap::ArgAction::Set)]
    pub pod_counting: bool,
    /// Most pod namespaces counted per pass; the rest are reported as truncated.
    #[arg(long, default_value_t = 256)]
    pub pod_max_namespaces: usize,
    /// Wall time one pass may spend finding and counting pods, so that a node full of
    /// namespaces cannot delay the host's tuning by more.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub pod_budget: Duration,
    /// Bind `/metrics` and the probes to this address instead of --metrics-addr's (same port).
    /// The DaemonSet sets it to the node's address (downward API `status.hostIP`) so a
    /// host-network agent does not listen on every interface of the node.
    #[arg(long, env = "NODETUNE_METRICS_HOST")]
    pub metrics_host: Option<IpAddr>,
    /// Serve `/metrics` only to a bearer token the API server authenticates (TokenReview) whose
    /// user may `get` the non-resource URL `/metrics` (SubjectAccessReview). Probes stay open.
    #[arg(long, env = "NODETUNE_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Connections served at once on the metrics port (more wait for none: they get a 503);
    /// 8 more are kept for the node's own probes.
    #[arg(long, default_value_t = crate::http::Limits::default().max_connections)]
    pub metrics_max_connections: usize,
    /// The host's `/`, mounted read-only: its sysctl.d files are compared with the profiles
    /// (report field `hostConfig`, condition `HostConfigDiffers`). Absent: not compared.
    #[arg(long, env = "NODETUNE_HOST_ROOT", default_value = crate::sysctl::hostconf::DEFAULT_HOST_ROOT)]
    pub host_root: PathBuf,
    /// A key corrected more than this many times within --contest-window is `Contested`:
    /// another writer keeps changing it, and its corrections back off.
    #[arg(long, default_value_t = 5)]
    pub contest_threshold: u32,
    /// The window --contest-threshold counts corrections in.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub contest_window: Duration,
    /// Longest pause before a contested key is corrected again (the pause starts at 30 s, or
    /// this if shorter, and doubles while the fight goes on).
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub contest_max_backoff: Duration,
    /// Root of the sysctl tree (the boot id is read under it too); only tests point it
    /// elsewhere.
    #[arg(long, default_value = "/proc/sys", hide = true)]
    pub proc_sys: PathBuf,
}

impl AgentArgs {
    /// The contested-key limits from the flags.
    pub fn contest_limits(&self) -> super::contest::ContestLimits {
        super::contest::ContestLimits {
            threshold: self.contest_threshold,
            window: self.contest_window,
            max_backoff: self.contest_max_backoff,
        }
    }

    /// Where `/metrics` and the probes listen: --metrics-addr, with --metrics-host's address.
    pub fn metrics_bind(&self) -> SocketAddr {
        match self.metrics_host {
            Some(ip) => SocketAddr::new(ip, self.metrics_addr.port()),
            None => self.metrics_addr,
        }
    }
}

#[cfg(test)]
impl AgentArgs {
    /// The flags' defaults for `node`, with the state directory and sysctl tree a test made:
    /// parsed by clap, so a new flag needs no change in every test that builds arguments.
    pub(crate) fn for_tests(
        node: &str,
        state_dir: &std::path::Path,
        proc_sys: &std::path::Path,
    ) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: AgentArgs,
        }
        let mut args = Wrapper::parse_from([
            "agent",
            "--node-name",
            node,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args;
        args.state_dir = state_dir.into();
        args.proc_sys = proc_sys.into();
        // Never the machine's own boot-time files: a test that wants some makes a root.
        args.host_root = state_dir.join("no-host-root");
        args
    }
}
