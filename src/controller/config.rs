//! `nodetune controller` arguments (clap derive, each with an environment fallback), and the small
//! parsers they need. No I/O except reading the host name for the default identity.
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// Default agent image: the controller's own version, so both halves always match.
pub const DEFAULT_AGENT_IMAGE: &str =
    concat!("ghcr.io/nodetune/nodetune:", env!("CARGO_PKG_VERSION"));

/// The cluster loop: agent DaemonSet, node labels, profile status, finalizers.
#[derive(Clone, Debug, Args)]
pub struct ControllerArgs {
    /// Namespace of the agent DaemonSet and of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodetune-system")]
    pub namespace: String,

    /// Image the agent DaemonSet runs.
    #[arg(long, env = "NODETUNE_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    pub agent_image: String,

    /// Pull policy of the agent image (`IfNotPresent`, `Always`, `Never`).
    #[arg(
        long,
        env = "NODETUNE_AGENT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = ["IfNotPresent", "Always", "Never"]
    )]
    pub agent_image_pull_policy: String,

    /// Pull secrets of the agent pods, as a YAML/JSON list (`[{"name": "regcred"}]`).
    #[arg(
        long,
        env = "NODETUNE_AGENT_IMAGE_PULL_SECRETS",
        default_value = "[]",
        value_parser = parse_pull_secrets
    )]
    pub agent_image_pull_secrets: PullSecrets,

    /// ConfigMap (in --namespace) holding the cluster sysctl policy under the key `policy.yaml`;
    /// mounted into every agent, which re-reads it each pass. Empty: no cluster policy.
    #[arg(long, env = "NODETUNE_AGENT_POLICY_CONFIGMAP", default_value = "")]
    pub agent_policy_configmap: String,

    /// Log filter of the agents (`RUST_LOG` syntax).
    #[arg(long, env = "NODETUNE_AGENT_LOG_LEVEL", default_value = "info")]
    pub agent_log_level: String,

    /// Agents log JSON lines instead of text.
    #[arg(long, env = "NODETUNE_AGENT_LOG_JSON")]
    pub agent_log_json: bool,

    /// Deployment (in --namespace) that owns the agent DaemonSet, normally the controller's own:
    /// deleting it (helm uninstall, kubectl delete) then removes the agents too. Empty: no owner.
    #[arg(long, env = "NODETUNE_OWNER_DEPLOYMENT", default_value = "")]
    pub owner_deployment: String,

    /// The owner reference resolved from --owner-deployment at start (needs the object's UID,
    /// so it cannot be a flag).
    #[arg(skip)]
    pub agent_owner: Option<OwnerReference>,

    /// ServiceAccount of the agent pods (separate from the controller's).
    #[arg(
        long,
        env = "NODETUNE_AGENT_SERVICE_ACCOUNT",
        default_value = "nodetune-agent"
    )]
    pub agent_service_account: String,

    /// How often each agent re-reads and re-applies (`30s`, `1m`, ...).
    #[arg(long, env = "NODETUNE_AGENT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub agent_interval: Duration,

    /// How often each agent refreshes its report even when nothing changed.
    #[arg(long, env = "NODETUNE_AGENT_HEARTBEAT", default_value = "120s", value_parser = parse_duration)]
    pub agent_heartbeat: Duration,

    /// Whether agents count TCP sockets in the node's pods' network namespaces. On, the agent
    /// pods get `hostPID` (to find pods' processes) and may list the node's pods.
    #[arg(long, env = "NODETUNE_AGENT_POD_COUNTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub agent_pod_counting: bool,
    /// Whether agents tune pods' network namespaces for pod-targeting profiles (renders
    /// `--pod-targeting=false` into the agents when off).
    #[arg(long, env = "NODETUNE_AGENT_POD_TARGETING", default_value_t = true, action = clap::ArgAction::Set)]
    pub agent_pod_targeting: bool,

    /// CPU request of the agent container (Kubernetes quantity; empty for none).
    #[arg(long, env = "NODETUNE_AGENT_CPU_REQUEST", default_value = "10m")]
    pub agent_cpu_request: String,

    /// Memory request of the agent container (empty for none).
    #[arg(long, env = "NODETUNE_AGENT_MEMORY_REQUEST", default_value = "32Mi")]
    pub agent_memory_request: String,

    /// CPU limit of the agent container (empty for none: a throttled agent only reports late).
    #[arg(long, env = "NODETUNE_AGENT_CPU_LIMIT", default_value = "")]
    pub agent_cpu_limit: String,

    /// Memory limit of the agent container (empty for none).
    #[arg(long, env = "NODETUNE_AGENT_MEMORY_LIMIT", default_value = "128Mi")]
    pub agent_memory_limit: String,

    /// Where each agent serves /metrics and its probes: `hostIP` (the node's address, from the
    /// downward API, so the host-network port is not open on every interface) or an IP address
    /// (`0.0.0.0` or `::` for all).
    #[arg(long, env = "NODETUNE_AGENT_METRICS_BIND", default_value = "0.0.0.0")]
    pub agent_metrics_bind: super::render::MetricsBind,

    /// Agents serve /metrics only to bearer tokens the API server authenticates and allows
    /// `get` on the non-resource URL /metrics (TokenReview + SubjectAccessReview).
    #[arg(long, env = "NODETUNE_AGENT_METRICS_AUTH")]
    pub agent_metrics_auth: bool,

    /// PriorityClass of the agent pods.
    #[arg(
        long,
        env = "NODETUNE_AGENT_PRIORITY_CLASS",
        default_value = "system-node-critical"
    )]
    pub agent_priority_class: String,

    /// DaemonSet rolling-update maxUnavailable (a count or a percentage).
    #[arg(long, env = "NODETUNE_AGENT_MAX_UNAVAILABLE", default_value = "10%", value_parser = parse_int_or_percent)]
    pub agent_max_unavailable: String,

    /// Tolerations every agent pod gets, as a YAML/JSON list; the profiles' tolerations are added
    /// to these. The default tolerates every taint, so the agent runs wherever a profile selects.
    #[arg(
        long,
        env = "NODETUNE_AGENT_DEFAULT_TOLERATIONS",
        default_value = r#"[{"operator": "Exists"}]"#,
        value_parser = parse_tolerations
    )]
    pub agent_default_tolerations: Tolerations,

    /// After this long since a profile's deletion, release its finalizer even if some nodes have
    /// not confirmed the restore (a Warning Event names how many).
    #[arg(long, env = "NODETUNE_FINALIZER_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub finalizer_timeout: Duration,

    /// A profile status change that only moves the TCP totals is written at most this often
    /// (conditions and node counts are written at once). `0s` writes every change.
    #[arg(long, env = "NODETUNE_STATUS_TELEMETRY_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub status_telemetry_interval: Duration,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "NODETUNE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

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

    /// Quiet time after a change before one reconcile pass runs over the whole state.
    #[arg(long, env = "NODETUNE_DEBOUNCE", default_value = "1s", value_parser = parse_duration)]
    pub debounce: Duration,
}

impl ControllerArgs {
    /// Arguments with every default, as if nothing had been passed (tests, embedding).
    pub fn defaults() -> Self {
        Self {
            namespace: "nodetune-system".into(),
            agent_image: DEFAULT_AGENT_IMAGE.into(),
            agent_image_pull_policy: "IfNotPresent".into(),
            agent_image_pull_secrets: PullSecrets::default(),
            agent_policy_configmap: String::new(),
            agent_log_level: "info".into(),
            agent_log_json: false,
            owner_deployment: String::new(),
            agent_owner: None,
            agent_service_account: "nodetune-agent".into(),
            agent_interval: Duration::from_secs(30),
            agent_heartbeat: Duration::from_secs(120),
            agent_pod_counting: true,
            agent_pod_targeting: true,
            agent_cpu_request: "10m".into(),
            agent_memory_request: "32Mi".into(),
            agent_cpu_limit: String::new(),
            agent_memory_limit: "128Mi".into(),
            agent_metrics_bind: super::render::MetricsBind::default(),
            agent_metrics_auth: false,
            agent_priority_class: "system-node-critical".into(),
            agent_max_unavailable: "10%".into(),
            agent_default_tolerations: Tolerations(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            finalizer_timeout: Duration::from_secs(300),
            status_telemetry_interval: Duration::from_secs(30),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            leader_election_namespace: None,
            lease_name: "nodetune-controller".into(),
            identity: None,
            debounce: Duration::from_secs(1),
        }
    }

    pub fn lease_namespace(&self) -> &str {
        self.leader_election_namespace
            .as_deref()
            .unwrap_or(&self.namespace)
    }

    /// `--identity`, else `<hostname>-<pid>`.
    pub fn identity(&self) -> String {
        if let Some(id) = self.identity.as_deref().filter(|s| !s.is_empty()) {
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

    #[test]
    fn clap_defaults_equal_defaults() {
        // Environment fallbacks would make this depend on the test runner; the names read here
        // are not set by cargo.
        let parsed = Wrapper::try_parse_from(["x"]).expect("parse").args;
        let d = ControllerArgs::defaults();
        if std::env::var_os("POD_NAMESPACE").is_none() {
            assert_eq!(parsed.namespace, d.namespace);
        }
        assert_eq!(parsed.agent_image, d.agent_image);
        assert_eq!(
            parsed.agent_default_tolerations,
            d.agent_default_tolerations
        );
        assert_eq!(parsed.finalizer_timeout, d.finalizer_timeout);
        assert_eq!(
            parsed.status_telemetry_interval,
            d.status_telemetry_interval
        );
        assert_eq!(parsed.metrics_addr, d.metrics_addr);
        assert_eq!(parsed.agent_max_unavailable, d.agent_max_unavailable);
        assert_eq!(parsed.debounce, d.debounce);
        assert_eq!(parsed.agent_image_pull_policy, d.agent_image_pull_policy);
        assert_eq!(parsed.agent_image_pull_secrets, d.agent_image_pull_secrets);
        assert_eq!(parsed.agent_policy_configmap, d.agent_policy_configmap);
        assert_eq!(parsed.agent_log_level, d.agent_log_level);
        assert_eq!(parsed.owner_deployment, d.owner_deployment);
        assert!(d.agent_image.ends_with(env!("CARGO_PKG_VERSION")));
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
