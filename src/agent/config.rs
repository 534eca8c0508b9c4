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
    /// Cluster sysctl policy (YAML or JSON, e.g. a mounted ConfigMap), re-read every pass. If it
    /// cannot be read or is invalid, nothing new is written until it is fixed.
    #[arg(long, env = "NODETUNE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// How often to re-read the keys (re-applying drift) and count TCP sockets.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub interval: Duration,
    /// Longest time between two report writes when nothing but TCP counts changed.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub heartbeat: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:9477")]
    pub metrics_addr: SocketAddr,
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
    /// Root of the sysctl tree (the boot id is read under it too); only tests point it
    /// elsewhere.
    #[arg(long, default_value = "/proc/sys", hide = true)]
    pub proc_sys: PathBuf,
}

impl AgentArgs {
    /// Where `/metrics` and the probes listen: --metrics-addr, with --metrics-host's address.
    pub fn metrics_bind(&self) -> SocketAddr {
        match self.metrics_host {
            Some(ip) => SocketAddr::new(ip, self.metrics_addr.port()),
            None => self.metrics_addr,
        }
    }
}
