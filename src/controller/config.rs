//! `nodetune controller` arguments (clap derive, each with an environment fallback), and the small
//! parsers they need. No I/O except reading the host name for the default identity.
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, FromArgMatches};
use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// Default agent image: the controller's own version, so both halves always match.
pub const DEFAULT_AGENT_IMAGE: &str =
    concat!("ghcr.io/nodetune/nodetune:", env!("CARGO_PKG_VERSION"));

/// The cluster loop: agent DaemonSet, node labels, profile status, finalizers. Flags and
/// environment names are what the chart and `deploy/` render: never rename one.
#[derive(Clone, Debug, PartialEq, Args)]
pub struct ControllerArgs {
    /// Namespace of the agent DaemonSet and of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodetune-system")]
    pub namespace: String,

    /// Deployment (in --namespace) that owns the agent DaemonSet, normally the controller's own:
    /// deleting it (helm uninstall, kubectl delete) then removes the agents too. Empty: no owner.
    #[arg(long, env = "NODETUNE_OWNER_DEPLOYMENT", default_value = "")]
    pub owner_deployment: String,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "NODETUNE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub agent: AgentTemplate,

    #[command(flatten)]
    pub timing: PassTiming,

    #[command(flatten)]
    pub leader: LeaderElection,
}

/// The agent DaemonSet's template: read only when rendering it (`--agent-*`).
#[derive(Clone, Debug, PartialEq, Args)]
pub struct AgentTemplate {
    /// Image the agent DaemonSet runs.
    #[arg(long = "agent-image", env = "NODETUNE_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    pub image: String,

    /// Pull policy of the agent image (`IfNotPresent`, `Always`, `Never`).
    #[arg(
        long = "agent-image-pull-policy",
        env = "NODETUNE_AGENT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = ["IfNotPresent", "Always", "Never"]
    )]
    pub image_pull_policy: String,

    /// Pull secrets of the agent pods, as a YAML/JSON list (`[{"name": "regcred"}]`).
    #[arg(
        long = "agent-image-pull-secrets",
        env = "NODETUNE_AGENT_IMAGE_PULL_SECRETS",
        default_value = "[]",
        value_parser = parse_pull_secrets
    )]
    pub image_pull_secrets: PullSecrets,

    /// ConfigMap (in --namespace) holding the cluster sysctl policy under the key `policy.yaml`;
    /// mounted into every agent, which re-reads it each pass. Empty: no cluster policy.
    #[arg(
        long = "agent-policy-configmap",
        env = "NODETUNE_AGENT_POLICY_CONFIGMAP",
        default_value = ""
    )]
    pub policy_configmap: String,

    /// Log filter of the agents (`RUST_LOG` syntax).
    #[arg(
        long = "agent-log-level",
        env = "NODETUNE_AGENT_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// Agents log JSON lines instead of text.
    #[arg(long = "agent-log-json", env = "NODETUNE_AGENT_LOG_JSON")]
    pub log_json: bool,

    /// ServiceAccount of the agent pods (separate from the controller's).
    #[arg(
        long = "agent-service-account",
        env = "NODETUNE_AGENT_SERVICE_ACCOUNT",
        default_value = "nodetune-agent"
    )]
    pub service_account: String,

    /// How often each agent re-reads and re-applies (`30s`, `1m`, ...).
    #[arg(long = "agent-interval", env = "NODETUNE_AGENT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub interval: Duration,

    /// How often each agent refreshes its report even when nothing changed.
    #[arg(long = "agent-heartbeat", env = "NODETUNE_AGENT_HEARTBEAT", default_value = "120s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Whether agents count TCP sockets in the node's pods' network namespaces. On, the agent
    /// pods get `hostPID` (to find pods' processes) and may list the node's pods.
    #[arg(long = "agent-pod-counting", env = "NODETUNE_AGENT_POD_COUNTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_counting: bool,

    /// Whether agents tune pods' network namespaces for pod-targeting profiles (renders
    /// `--pod-targeting=false` into the agents when off).
    #[arg(long = "agent-pod-targeting", env = "NODETUNE_AGENT_POD_TARGETING", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_targeting: bool,

    /// Whether agents may write the persistence file (`spec.persist`): mounts the host's
    /// `/etc/sysctl.d` writable into the agents, over the read-only host root. Off (default),
    /// nothing of the host is writable and persistent profiles are only applied.
    #[arg(long = "agent-persist", env = "NODETUNE_AGENT_PERSIST", default_value_t = false, action = clap::ArgAction::Set)]
    pub persist: bool,

    /// CPU request of the agent container (Kubernetes quantity; empty for none).
    #[arg(
        long = "agent-cpu-request",
        env = "NODETUNE_AGENT_CPU_REQUEST",
        default_value = "10m"
    )]
    pub cpu_request: String,

    /// Memory request of the agent container (empty for none).
    #[arg(
        long = "agent-memory-request",
        env = "NODETUNE_AGENT_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    pub memory_request: String,

    /// CPU limit of the agent container (empty for none: a throttled agent only reports late).
    #[arg(
        long = "agent-cpu-limit",
        env = "NODETUNE_AGENT_CPU_LIMIT",
        default_value = ""
    )]
    pub cpu_limit: String,

    /// Memory limit of the agent container (empty for none).
    #[arg(
        long = "agent-memory-limit",
        env = "NODETUNE_AGENT_MEMORY_LIMIT",
        default_value = "128Mi"
    )]
    pub memory_limit: String,

    /// Where each agent serves /metrics and its probes: `hostIP` (the node's address, from the
    /// downward API, so the host-network port is not open on every interface) or an IP address
    /// (`0.0.0.0` or `::` for all).
    #[arg(
        long = "agent-metrics-bind",
        env = "NODETUNE_AGENT_METRICS_BIND",
        default_value = "0.0.0.0"
    )]
    pub metrics_bind: super::render::MetricsBind,

    /// Agents serve /metrics only to bearer tokens the API server authenticates and allows
    /// `get` on the non-resource URL /metrics (TokenReview + SubjectAccessReview).
    #[arg(long = "agent-metrics-auth", env = "NODETUNE_AGENT_METRICS_AUTH")]
    pub metrics_auth: bool,

    /// PriorityClass of the agent pods.
    #[arg(
        long = "agent-priority-class",
        env = "NODETUNE_AGENT_PRIORITY_CLASS",
        default_value = "system-node-critical"
    )]
    pub priority_class: String,

    /// DaemonSet rolling-update maxUnavailable (a count or a percentage).
    #[arg(long = "agent-max-unavailable", env = "NODETUNE_AGENT_MAX_UNAVAILABLE", default_value = "10%", value_parser = parse_int_or_percent)]
    pub max_unavailable: String,

    /// Tolerations every agent pod gets, as a YAML/JSON list; the profiles' tolerations are added
    /// to these. The default tolerates every taint, so the agent runs wherever a profile selects.
    #[arg(
        long = "agent-default-tolerations",
        env = "NODETUNE_AGENT_DEFAULT_TOLERATIONS",
        default_value = r#"[{"operator": "Exists"}]"#,
        value_parser = parse_tolerations
    )]
    pub default_tolerations: Tolerations,
}

/// When the controller writes and gives up.
#[derive(Clone, Debug, PartialEq, Args)]
pub struct PassTiming {
    /// After this long since a profile's deletion, release its finalizer even if some nodes have
    /// not confirmed the restore (a Warning Event names how many).
    #[arg(long, env = "NODETUNE_FINALIZER_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub finalizer_timeout: Duration,

    /// A profile status change that only moves the TCP totals is written at most this often
    /// (conditions and node counts are written at once). `0s` writes every change.
    #[arg(long, env = "NODETUNE_STATUS_TELEMETRY_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub status_telemetry_interval: Duration,

    /// Quiet time after a telemetry change (TCP counts) before one reconcile pass runs over the
    /// whole state; a report's change of standing starts a pass at once, at most once per this
    /// interval.
    #[arg(long, env = "NODETUNE_DEBOUNCE", default_value = "1s", value_parser = parse_duration)]
    pub debounce: Duration,
}

/// The leader-election Lease.
#[derive(Clone, Debug, PartialEq, Args)]
pub struct LeaderElection {
    /// Namespace of the leader-election Lease (defaults to --namespace).
    #[arg(long, env = "NODETUNE_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "NODETUNE_LEASE_NAME",
        default_value = "nodetune-controller"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (defaults to the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// The controller's settings once started: its flags, and what was resolved from them against
/// the cluster (values no flag can carry).
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerContext {
    pub args: ControllerArgs,
    /// The owner reference resolved from --owner-deployment at start (needs the object's UID,
    /// so it cannot be a flag).
    pub agent_owner: Option<OwnerReference>,
}

impl ControllerContext {
    /// Settings with nothing resolved yet.
    pub fn new(args: ControllerArgs) -> Self {
        Self {
            args,
            agent_owner: None,
        }
    }
}

impl ControllerArgs {
    /// Arguments with every default, as if nothing had been passed and no environment variable
    /// set (tests, embedding). Built by clap from the flags' own defaults, so there is no second
    /// copy of them to drift.
    pub fn defaults() -> Self {
        let command = Self::augment_args(clap::Command::new("nodetune-controller"))
            .mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(["nodetune-controller"])
            .expect("every controller flag has a default that parses");
        Self::from_arg_matches(&matches).expect("clap's matches fit the struct they came from")
    }

    pub fn lease_namespace(&self) -> &str {
        self.leader
            .leader_election_namespace
            .as_deref()
            .unwrap_or(&self.namespace)
    }

    /// `--identity`, else `<hostname>-<pid>`.
    pub fn identity(&self) -> String {
        if let Some(id) = self.leader.identity.as_deref().filter(|s| !s.is_empty()) {
            return id.to_string();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "nodetune-controller".into());
        format!("{host}-{}", std::process::id())
    }
}

/// A list of tolerations given on the command line (newtype so clap treats it as one value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tolerations(pub Vec<Toleration>);

fn parse_tolerations(s: &str) -> Result<Tolerations, String> {
    if s.trim().is_empty() {
        return Ok(Tolerations::default());
    }
    serde_yaml::from_str::<Vec<Toleration>>(s)
        .map(Tolerations)
        .map_err(|e| format!("not a YAML/JSON list of tolerations: {e}"))
}

/// Image pull secrets given on the command line (newtype so clap treats the list as one value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PullSecrets(pub Vec<LocalObjectReference>);

fn parse_pull_secrets(s: &str) -> Result<PullSecrets, String> {
    if s.trim().is_empty() {
        return Ok(PullSecrets::default());
    }
    let list = serde_yaml::from_str::<Vec<LocalObjectReference>>(s)
        .map_err(|e| format!("not a YAML/JSON list of {{name: ...}}: {e}"))?;
    if list.iter().any(|r| r.name.is_empty()) {
        return Err("an image pull secret without a name".into());
    }
    Ok(PullSecrets(list))
}

fn parse_int_or_percent(s: &str) -> Result<String, String> {
    let digits = s.strip_suffix('%').unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is neither a count (e.g. 1) nor a percentage (e.g. 10%)"
        ))
    }
}

/// Durations as every nodetune flag takes them (`30s`, `5m`, `250ms`; see `crate::duration`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5x").is_err());
        // What the DaemonSet passes to the agent reads back to the same value.
        for d in ["30s", "300s", "1500ms", "0s", "90s"] {
            assert_eq!(
                crate::duration::format(parse_duration(d).expect("parse")),
                d
            );
        }
    }

    #[test]
    fn max_unavailable() {
        assert!(parse_int_or_percent("10%").is_ok());
        assert!(parse_int_or_percent("3").is_ok());
        assert!(parse_int_or_percent("%").is_err());
        assert!(parse_int_or_percent("ten").is_err());
    }

    /// Whether the test runner's environment sets a name a flag falls back on (in a pod,
    /// POD_NAMESPACE and POD_NAME are): then plain parsing cannot be compared with defaults.
    fn environment_sets_a_flag() -> bool {
        use clap::CommandFactory;
        Wrapper::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .any(|name| std::env::var_os(name).is_some())
    }

    #[test]
    fn clap_defaults_equal_defaults() {
        // The whole struct, so a new flag is covered without touching this test.
        if !environment_sets_a_flag() {
            let parsed = Wrapper::try_parse_from(["x"]).expect("parse").args;
            assert_eq!(parsed, ControllerArgs::defaults());
        }
        // Values the chart and the docs promise, whatever the environment.
        let d = ControllerArgs::defaults();
        assert_eq!(d.namespace, "nodetune-system");
        assert!(d.agent.image.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(
            d.agent.default_tolerations,
            Tolerations(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }])
        );
        assert_eq!(d.timing.finalizer_timeout, Duration::from_secs(300));
        assert_eq!(d.timing.status_telemetry_interval, Duration::from_secs(30));
        assert_eq!(d.timing.debounce, Duration::from_secs(1));
        assert_eq!(d.metrics_addr, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert_eq!(d.agent.max_unavailable, "10%");
        assert_eq!(d.agent.image_pull_policy, "IfNotPresent");
        assert_eq!(d.agent.image_pull_secrets, PullSecrets::default());
        assert_eq!(d.agent.policy_configmap, "");
        assert_eq!(d.agent.log_level, "info");
        assert_eq!(d.owner_deployment, "");
        assert_eq!(d.leader.identity, None);
    }

    #[test]
    fn flags_keep_their_names_in_groups() {
        use clap::CommandFactory;
        let command = Wrapper::command();
        let longs: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        // Every flag the chart renders, spelled as before the arguments were grouped.
        for flag in [
            "namespace",
            "agent-image",
            "agent-image-pull-policy",
            "agent-image-pull-secrets",
            "agent-policy-configmap",
            "agent-log-level",
            "agent-log-json",
            "owner-deployment",
            "agent-service-account",
            "agent-interval",
            "agent-heartbeat",
            "agent-pod-counting",
            "agent-pod-targeting",
            "agent-persist",
            "agent-cpu-request",
            "agent-memory-request",
            "agent-cpu-limit",
            "agent-memory-limit",
            "agent-metrics-bind",
            "agent-metrics-auth",
            "agent-priority-class",
            "agent-max-unavailable",
            "agent-default-tolerations",
            "finalizer-timeout",
            "status-telemetry-interval",
            "metrics-addr",
            "leader-election-namespace",
            "lease-name",
            "identity",
            "debounce",
        ] {
            assert!(longs.contains(&flag), "--{flag} is gone");
        }
        assert_eq!(longs.len(), 30, "a flag was added: list it above");
    }

    #[test]
    fn pull_secrets_parse() {
        let p = parse_pull_secrets(r#"[{"name": "regcred"}]"#).expect("json");
        assert_eq!(p.0.len(), 1);
        assert_eq!(p.0[0].name, "regcred");
        assert_eq!(parse_pull_secrets("[]"), Ok(PullSecrets::default()));
        assert!(parse_pull_secrets(r#"[{"name": ""}]"#).is_err());
        assert!(parse_pull_secrets("regcred").is_err());
    }

    #[test]
    fn tolerations_parse() {
        let t = parse_tolerations(
            "- key: dedicated\n  operator: Equal\n  value: db\n  effect: NoSchedule\n",
        )
        .expect("yaml");
        assert_eq!(t.0.len(), 1);
        assert_eq!(t.0[0].key.as_deref(), Some("dedicated"));
        assert_eq!(parse_tolerations(""), Ok(Tolerations::default()));
        assert!(parse_tolerations("{not: a list}").is_err());
    }
}
