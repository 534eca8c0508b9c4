//! Command-line arguments (clap derive). Parsing only: `main` wires them to the modules.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `nodetune --version`: the crate version and the commit it was built from (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NODETUNE_GIT_COMMIT"),
    ")"
);

/// The exit status of plan, apply, restore and convert.
const EXIT_CODES: &str = "\
Exit status:
  0  everything applies (plan), was applied or restored (apply, restore), or converted (convert)
  1  error: unreadable or invalid input, policy or state directory; nothing was done
  2  partly: some key would not apply or was not applied (denied, invalid, unsupported, failed;
     an optional '-' key missing on this kernel does not count), a ledger entry was not
     restored or the ledger had to be set aside (restore), or a line was left out (convert)";

#[derive(Debug, Parser)]
#[command(
    name = "nodetune",
    version = VERSION,
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
    /// Show what applying a profile here would change, with the same checks as apply.
    #[command(after_help = EXIT_CODES)]
    Plan(PlanArgs),
    /// Apply a profile to this machine (`--local`); the cluster path is `kubectl apply`.
    #[command(after_help = EXIT_CODES)]
    Apply(ApplyArgs),
    /// Put back every original value nodetune recorded on this machine.
    #[command(after_help = EXIT_CODES)]
    Restore(RestoreArgs),
    /// Turn a sysctl.conf into NodeTuningProfile manifests (one per 256 keys).
    #[command(after_help = EXIT_CODES)]
    Convert(ConvertArgs),
    /// Print the CustomResourceDefinitions (or write one file each into a directory).
    Crd(CrdArgs),
    /// Delete every nodetune profile and report, restoring nodes first (`--force`: controller gone).
    Uninstall(nodetune::uninstall::UninstallArgs),
    /// The pods and nodes with the most TIME_WAIT (or CLOSE_WAIT) sockets, from the reports.
    /// Installed as `kubectl-nodetune` on the PATH: `kubectl nodetune top`.
    Top(nodetune::top::TopArgs),
    /// A stand-in for a busy proxy pod, for the kubelet tests (holds ESTABLISHED and
    /// CLOSE_WAIT sockets, keeps making TIME_WAIT ones).
    #[command(hide = true)]
    TestWorkload(nodetune::podnet::workload::WorkloadArgs),
    /// A profile's staged rollout: `status` waits (exit 1 when rolled back or paused by a
    /// guard, like `kubectl rollout status`), `pause`, `resume`, `undo`.
    Rollout(nodetune::rollout_cmd::RolloutArgs),
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
    /// `auto` (netlink sock_diag in one walk of both families, else one dump per family, else
    /// /proc/net/tcp{,6}), `netlink`, `netlink-per-family` or `procfs`.
    #[arg(long, default_value = "auto")]
    pub source: nodetune::tcpstat::SourceChoice,
    /// Print again every N seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
    /// Count every other network namespace on the machine too (root: needs setns), each named
    /// by its pod where it has one. `--source` does not apply to them (netlink, else procfs).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// NodeTuningProfile manifest(s): a file, `-` for standard input, or a directory (its
    /// .yaml, .yml and .json files). Several profiles are merged by priority as on a node.
    #[arg(short = 'f', long = "filename", value_name = "PROFILE.yaml")]
    pub file: PathBuf,
    #[command(flatten)]
    pub policy: PolicyArg,
    /// Also compare with the boot-time sysctl configuration (sysctl.d files and
    /// /etc/sysctl.conf, as systemd-sysctl reads them) of the system rooted here, e.g. `/`, or
    /// a node's root file system mounted elsewhere: where it sets a key to another value, the
    /// file and line are shown.
    #[arg(long, value_name = "DIR")]
    pub host_root: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct PolicyArg {
    /// Cluster sysctl policy (YAML or JSON: allowedScopes, allowedKeys, deniedKeys,
    /// allowWeakening) checked before every write, restores included.
    #[arg(long = "policy", env = "NODETUNE_POLICY_FILE", value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Apply to this machine, without a cluster.
    #[arg(long, required = true)]
    pub local: bool,
    /// A file, `-` for standard input, or a directory (as for plan).
    #[arg(short = 'f', long = "filename", value_name = "PROFILE.yaml")]
    pub file: PathBuf,
    #[command(flatten)]
    pub write: LocalWriteArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Restore this machine, without a cluster.
    #[arg(long, required = true)]
    pub local: bool,
    #[command(flatten)]
    pub write: LocalWriteArgs,
    /// The root of the system whose boot-time config nodetune's agent may have written
    /// (`spec.persist`): where the ledger records it, `<DIR>/etc/sysctl.d/99-zz-nodetune.conf`
    /// is removed too, so the restored values also hold after the next boot.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
}

/// What the commands that write this machine's sysctls share: the ledger, the policy checked
/// before every write, and how results are printed.
#[derive(Debug, Args)]
pub struct LocalWriteArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(flatten)]
    pub policy: PolicyArg,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Where the ledger of original values lives.
    #[arg(long, env = "NODETUNE_STATE_DIR", default_value = nodetune::sysctl::DEFAULT_STATE_DIR)]
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
    /// Leave out lines this cluster sysctl policy refuses (as for plan).
    #[command(flatten)]
    pub policy: PolicyArg,
}

#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Write `<name>.yaml` per CRD into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap checks argument definitions only when a subcommand is parsed; check them all here.
    #[test]
    fn arguments_are_well_formed() {
        Cli::command().debug_assert();
    }
}
