//! Command-line arguments (clap derive). Parsing only: `main` wires them to the modules.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "nodetune",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("NODETUNE_GIT_COMMIT"), ")"),
    about = "Declarative sysctl tuning and TCP state reporting for Kubernetes nodes"
)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "NODETUNE_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cluster controller (one active replica, leader-elected).
    Controller(Box<nodetune::controller::config::ControllerArgs>),
    /// Run the node agent (one per node, in the DaemonSet the controller manages).
    Agent(nodetune::agent::AgentArgs),
    /// Count TCP sockets per state (IPv4, IPv6, total) in this network namespace.
    Tcpstat(TcpstatArgs),
    /// Show what applying a profile here would change.
    Plan(PlanArgs),
    /// Apply a profile to this machine (`--local`); the cluster path is `kubectl apply`.
    Apply(ApplyArgs),
    /// Put back every original value nodetune recorded on this machine.
    Restore(RestoreArgs),
    /// Turn a sysctl.conf into a NodeTuningProfile manifest.
    Convert(ConvertArgs),
    /// Print the CustomResourceDefinitions (or write one file each into a directory).
    Crd(CrdArgs),
    /// Delete every nodetune profile and report, restoring nodes first (`--force`: controller gone).
    Uninstall(nodetune::uninstall::UninstallArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct TcpstatArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// `auto` (netlink sock_diag, else /proc/net/tcp{,6}), `netlink` or `procfs`.
    #[arg(long, default_value = "auto")]
    pub source: nodetune::tcpstat::SourceChoice,
    /// Print again every N seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// NodeTuningProfile manifest(s); several documents are merged by priority as on a node.
    #[arg(short = 'f', long = "filename", value_name = "PROFILE.yaml")]
    pub file: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Apply to this machine, without a cluster.
    #[arg(long, required = true)]
    pub local: bool,
    #[arg(short = 'f', long = "filename", value_name = "PROFILE.yaml")]
    pub file: PathBuf,
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Restore this machine, without a cluster.
    #[arg(long, required = true)]
    pub local: bool,
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Where the ledger of original values lives.
    #[arg(long, env = "NODETUNE_STATE_DIR", default_value = "/var/lib/nodetune")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// sysctl.conf to read; `-` or absent reads standard input.
    pub file: Option<PathBuf>,
    /// metadata.name of the profile.
    #[arg(long)]
    pub name: String,
    /// Node label `key=value` the profile selects (repeatable; all must match).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    pub selectors: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Write `<name>.yaml` per CRD into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}
