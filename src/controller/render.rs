//! The agent DaemonSet, rendered from the controller's arguments and the profiles' tolerations.
//! Pure: the same inputs give the same object, byte for byte, so the controller can skip the
//! apply when nothing changed.
//!
//! Only the toleration union depends on the profiles; selectors are expressed through the node
//! label [`AGENT_NODE_LABEL`] the controller manages, so adding, editing or deleting a profile never
//! rolls the agent pods (and with the default "tolerate everything" it cannot change the template
//! at all).
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{AgentTemplate, ControllerContext};
use crate::api::NodeTuningProfile;
use crate::duration::format as format_duration;

pub use crate::names::{AGENT_NODE_LABEL, DAEMONSET_NAME};
/// Where the agent keeps its ledger of original values, on the host and in the container.
pub const STATE_DIR: &str = crate::sysctl::ledger::DEFAULT_STATE_DIR;
/// The agent's `/metrics`, `/healthz`, `/readyz` port.
pub const AGENT_PORT: i32 = 9477;
const CONTAINER_NAME: &str = "agent";
/// Where the cluster sysctl policy ConfigMap is mounted in the agent container.
pub const POLICY_DIR: &str = "/etc/nodetune/policy";
/// The ConfigMap key (and file name) of the cluster sysctl policy.
pub const POLICY_KEY: &str = "policy.yaml";

/// Where the agents bind their metrics port (`--agent-metrics-bind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsBind {
    /// The node's address (downward API `status.hostIP`), which is also where the kubelet
    /// probes a host-network pod.
    HostIp,
    /// A fixed address; `0.0.0.0` or `::` for every interface.
    Addr(std::net::IpAddr),
}

impl Default for MetricsBind {
    fn default() -> Self {
        Self::Addr(std::net::Ipv4Addr::UNSPECIFIED.into())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is neither `hostIP` nor an IP address")]
pub struct BadMetricsBind(String);

impl std::str::FromStr for MetricsBind {
    type Err = BadMetricsBind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "hostIP" {
            return Ok(Self::HostIp);
        }
        s.parse()
            .map(Self::Addr)
            .map_err(|_| BadMetricsBind(s.into()))
    }
}

/// The agent's `--metrics-addr` argument and the environment that completes it: with
/// `hostIP`, the agent binds the address the downward API gives it in `NODETUNE_METRICS_HOST`
/// (environment rather than a flag, so an older agent image still starts, on all interfaces).
fn metrics_bind(agent: &AgentTemplate) -> (String, Vec<EnvVar>) {
    let mut env = Vec::new();
    let ip = match agent.metrics_bind {
        MetricsBind::HostIp => {
            env.push(field_env("NODETUNE_METRICS_HOST", "status.hostIP"));
            std::net::Ipv4Addr::UNSPECIFIED.into()
        }
        MetricsBind::Addr(ip) => ip,
    };
    if agent.metrics_auth {
        env.push(EnvVar {
            name: "NODETUNE_METRICS_AUTH".into(),
            value: Some("true".into()),
            ..Default::default()
        });
    }
    let addr = std::net::SocketAddr::new(ip, AGENT_PORT.unsigned_abs() as u16);
    (format!("--metrics-addr={addr}"), env)
}

/// Labels on the DaemonSet and its pods.
pub fn agent_labels() -> BTreeMap<String, String> {
    [
        (
            "app.kubernetes.io/name".to_string(),
            crate::names::APP_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            crate::names::AGENT_COMPONENT.to_string(),
        ),
    ]
    .into()
}

/// Defaults plus every profile's tolerations, deduplicated and in a stable order. A toleration
/// with no key and operator `Exists` tolerates every taint: when present it is the only one kept.
/// The startup taint is always tolerated: the agent is what removes it.
pub fn toleration_union<'a>(
    defaults: &[Toleration],
    profiles: impl IntoIterator<Item = &'a NodeTuningProfile>,
) -> Vec<Toleration> {
    let mut all: Vec<Toleration> = defaults.iter().cloned().map(normalize).collect();
    all.push(normalize(Toleration {
        key: Some(crate::agent::taint::TAINT_KEY.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }));
    all.extend(
        profiles
            .into_iter()
            .flat_map(|p| p.spec.tolerations.iter().cloned().map(normalize)),
    );
    if let Some(everything) = all.iter().find(|t| tolerates_everything(t)) {
        return vec![everything.clone()];
    }
    all.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    all.dedup_by(|a, b| sort_key(a) == sort_key(b));
    all
}

fn tolerates_everything(t: &Toleration) -> bool {
    t.key.as_deref().unwrap_or_default().is_empty()
        && t.operator.as_deref() == Some("Exists")
        && t.effect.as_deref().unwrap_or_default().is_empty()
        && t.toleration_seconds.is_none()
}

/// Spell defaults out so equal tolerations compare equal (`operator` defaults to `Equal`; empty
/// strings mean absent).
fn normalize(mut t: Toleration) -> Toleration {
    let none_if_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    t.key = none_if_empty(t.key);
    t.value = none_if_empty(t.value);
    t.effect = none_if_empty(t.effect);
    t.operator = Some(none_if_empty(t.operator).unwrap_or_else(|| "Equal".into()));
    t
}

type TolerationKey<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<i64>,
);

fn sort_key(t: &Toleration) -> TolerationKey<'_> {
    (
        t.key.as_deref(),
        t.operator.as_deref(),
        t.value.as_deref(),
        t.effect.as_deref(),
        t.toleration_seconds,
    )
}

fn resources(pairs: [(&str, &str); 2]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
    (!map.is_empty()).then_some(map)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(AGENT_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Mounts the host's `/` read-only at the agent's host root (its name in the environment is
/// [`host_root_env`]).
fn add_host_root(mounts: &mut Vec<VolumeMount>, volumes: &mut Vec<Volume>) {
    // The host's boot-time sysctl files (sysctl.d, /etc/sysctl.conf), compared with the
    // profiles: read-only (recursively where the runtime can), and the agent opens every path
    // in it with openat2(RESOLVE_IN_ROOT), so no link leads out of it.
    mounts.push(VolumeMount {
        name: "host".into(),
        mount_path: crate::sysctl::hostconf::DEFAULT_HOST_ROOT.into(),
        read_only: Some(true),
        recursive_read_only: Some("IfPossible".into()),
        mount_propagation: Some("None".into()),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "host".into(),
        host_path: Some(HostPathVolumeSource {
            path: "/".into(),
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    });
}

/// Persistence (`--agent-persist`): the host's `/etc/sysctl.d`, writable, over the read-only
/// host root, so the agent can write its own file there and nothing else of the host.
fn add_host_sysctl_d(mounts: &mut Vec<VolumeMount>, volumes: &mut Vec<Volume>) {
    mounts.push(VolumeMount {
        name: "host-sysctl-d".into(),
        mount_path: format!(
            "{}/{}",
            crate::sysctl::hostconf::DEFAULT_HOST_ROOT,
            crate::agent::persist::DIR
        ),
        mount_propagation: Some("None".into()),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "host-sysctl-d".into(),
        host_path: Some(HostPathVolumeSource {
            path: format!("/{}", crate::agent::persist::DIR),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    });
}

/// The host root mounted by [`add_host_root`], named in the environment (not a flag, which older
/// agents would refuse) although it is the default, so the mount and the agent cannot drift
/// apart.
fn host_root_env() -> EnvVar {
    value_env(
        "NODETUNE_HOST_ROOT",
        crate::sysctl::hostconf::DEFAULT_HOST_ROOT,
    )
}

/// The agent DaemonSet in `--namespace`, tolerating `tolerations` (see [`toleration_union`]).
pub fn render_daemonset(ctx: &ControllerContext, tolerations: Vec<Toleration>) -> DaemonSet {
    let agent = &ctx.args.agent;
    let labels = agent_labels();
    DaemonSet {
        metadata: ObjectMeta {
            name: Some(DAEMONSET_NAME.into()),
            namespace: Some(ctx.args.namespace.clone()),
            labels: Some(labels.clone()),
            // Deleting the owner (the controller's Deployment) lets the garbage collector remove
            // the agents, so no uninstall path leaves them behind.
            owner_references: ctx.agent_owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(agent_pod_spec(agent, tolerations)),
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(int_or_percent(&agent.max_unavailable)),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The agent pod: host namespaces, identity, scheduling, the one container and its volumes.
fn agent_pod_spec(agent: &AgentTemplate, tolerations: Vec<Toleration>) -> PodSpec {
    let (mounts, volumes) = agent_volumes(agent);
    PodSpec {
        // The agent tunes and counts in the node's own network and IPC namespaces: a pod
        // namespace would only ever see (and change) its own copy of net.* and kernel.shm*.
        host_network: Some(true),
        host_ipc: Some(true),
        // Pods' processes, to find their network namespaces (issue 18): only when counting or
        // tuning pods.
        host_pid: Some(agent.pod_counting || agent.pod_targeting),
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        service_account_name: Some(agent.service_account.clone()),
        automount_service_account_token: Some(true),
        priority_class_name: Some(agent.priority_class.clone()).filter(|p| !p.is_empty()),
        image_pull_secrets: Some(agent.image_pull_secrets.0.clone()).filter(|s| !s.is_empty()),
        node_selector: Some([(AGENT_NODE_LABEL.to_string(), "true".to_string())].into()),
        tolerations: Some(tolerations),
        termination_grace_period_seconds: Some(30),
        containers: vec![agent_container(agent, mounts)],
        volumes: Some(volumes),
        ..Default::default()
    }
}

/// The agent container: its flags, environment, probes, resources and privileges.
fn agent_container(agent: &AgentTemplate, mounts: Vec<VolumeMount>) -> Container {
    let (args, env) = agent_args_and_env(agent);
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(agent.image.clone()),
        image_pull_policy: Some(agent.image_pull_policy.clone()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: AGENT_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 20, 3)),
        readiness_probe: Some(http_probe("/readyz", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: resources([
                ("cpu", &agent.cpu_request),
                ("memory", &agent.memory_request),
            ]),
            limits: resources([("cpu", &agent.cpu_limit), ("memory", &agent.memory_limit)]),
            ..Default::default()
        }),
        // Writing /proc/sys needs a privileged container (the runtime mounts it read-only
        // otherwise), and root: the image's default user is non-root, and the state dir on the
        // host is root's. The root filesystem itself stays read-only.
        security_context: Some(SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// The agent's command line and environment.
fn agent_args_and_env(agent: &AgentTemplate) -> (Vec<String>, Vec<EnvVar>) {
    let mut env = vec![
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    if !agent.log_level.is_empty() {
        env.push(value_env("RUST_LOG", &agent.log_level));
    }
    if agent.log_json {
        env.push(value_env("NODETUNE_LOG_JSON", "true"));
    }
    let (metrics_addr, metrics_env) = metrics_bind(agent);
    env.extend(metrics_env);
    if agent.pod_counting {
        // The variable rather than a flag, like the policy file: older agents still start.
        env.push(value_env("NODETUNE_POD_COUNTING", "true"));
    }
    env.push(host_root_env());
    if !agent.policy_configmap.is_empty() {
        // The environment variable rather than the flag keeps older agents (which lack it)
        // starting.
        env.push(value_env(
            "NODETUNE_POLICY_FILE",
            &format!("{POLICY_DIR}/{POLICY_KEY}"),
        ));
    }
    let mut args = vec![
        "agent".into(),
        format!("--state-dir={STATE_DIR}"),
        format!("--interval={}", format_duration(agent.interval)),
        format!("--heartbeat={}", format_duration(agent.heartbeat)),
        metrics_addr,
    ];
    // Only when off, so the default pod template (and so the agents) stays as it was.
    if !agent.pod_targeting {
        args.push("--pod-targeting=false".into());
    }
    (args, env)
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The agent's mounts and the pod's volumes: the ledger's state directory on the host, the
/// host's `/` read-only, and the cluster policy ConfigMap when there is one.
fn agent_volumes(agent: &AgentTemplate) -> (Vec<VolumeMount>, Vec<Volume>) {
    let mut mounts = vec![VolumeMount {
        name: "state".into(),
        mount_path: STATE_DIR.into(),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "state".into(),
        host_path: Some(HostPathVolumeSource {
            path: STATE_DIR.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    }];
    add_host_root(&mut mounts, &mut volumes);
    if agent.persist {
        add_host_sysctl_d(&mut mounts, &mut volumes);
    }
    if !agent.policy_configmap.is_empty() {
        // A mounted ConfigMap follows edits (the kubelet refreshes it), and the agent re-reads
        // the file every pass, so a policy change needs no agent rollout.
        mounts.push(VolumeMount {
            name: "policy".into(),
            mount_path: POLICY_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "policy".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: agent.policy_configmap.clone(),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (mounts, volumes)
}

fn int_or_percent(s: &str) -> IntOrString {
    match s.parse::<i32>() {
        Ok(n) => IntOrString::Int(n),
        Err(_) => IntOrString::String(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerArgs;

    fn tol(key: &str, value: &str, effect: &str) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Equal".into()),
            value: Some(value.into()),
            effect: Some(effect.into()),
            ..Default::default()
        }
    }

    pub(super) fn pod_spec(ds: &DaemonSet) -> &PodSpec {
        ds.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    /// The pod's volume named `name`.
    fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a k8s_openapi::api::core::v1::Volume {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    }

    /// The first container's mount of the volume named `name`.
    fn mount<'a>(pod: &'a PodSpec, name: &str) -> &'a k8s_openapi::api::core::v1::VolumeMount {
        pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("mount {name}"))
    }

    #[test]
    fn shape() {
        let cfg = ControllerContext::new(ControllerArgs::defaults());
        let ds = render_daemonset(
            &cfg,
            toleration_union(&cfg.args.agent.default_tolerations.0, []),
        );
        assert_eq!(ds.metadata.name.as_deref(), Some(DAEMONSET_NAME));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("nodetune-system"));
        let pod = pod_spec(&ds);
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|s| s.get(AGENT_NODE_LABEL))
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.host_pid, Some(true), "pod counting is on by default");
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(pod.service_account_name.as_deref(), Some("nodetune-agent"));
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        let c = &pod.containers[0];
        assert_eq!(c.name, "agent");
        assert_eq!(
            c.args.as_deref().unwrap_or_default(),
            [
                "agent",
                "--state-dir=/var/lib/nodetune",
                "--interval=30s",
                "--heartbeat=120s",
                "--metrics-addr=0.0.0.0:9477"
            ]
        );
        assert_eq!(
            c.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );
        // The image's default user is non-root: the agent must ask for root.
        assert_eq!(
            c.security_context.as_ref().and_then(|s| s.run_as_user),
            Some(0)
        );
        let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(
            env,
            [
                "NODE_NAME",
                "POD_NAME",
                "POD_NAMESPACE",
                "RUST_LOG",
                "NODETUNE_POD_COUNTING",
                "NODETUNE_HOST_ROOT"
            ]
        );
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert!(!limits.contains_key("cpu"), "empty cpu limit means none");
        let vol = &pod.volumes.as_ref().expect("volumes")[0];
        let hp = vol.host_path.as_ref().expect("hostPath");
        assert_eq!(
            (hp.path.as_str(), hp.type_.as_deref()),
            (STATE_DIR, Some("DirectoryOrCreate"))
        );
        let strategy = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .expect("strategy");
        assert_eq!(
            strategy
                .rolling_update
                .as_ref()
                .and_then(|r| r.max_unavailable.clone()),
            Some(IntOrString::String("10%".into()))
        );
        // The selector must match the template's labels or the apiserver refuses the object.
        let sel = ds
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone());
        let tpl = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone());
        assert_eq!(sel, tpl);
    }

    /// Issue 19: the host's `/` is mounted read-only at the agent's default host root.
    #[test]
    fn only_sysctl_d_becomes_writable_and_only_with_persistence() {
        let mut args = ControllerArgs::defaults();
        let writable = |args: &ControllerArgs| -> Vec<(String, String)> {
            let ds = render_daemonset(&ControllerContext::new(args.clone()), vec![]);
            let pod = pod_spec(&ds);
            let volumes = pod.volumes.clone().unwrap_or_default();
            pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| m.read_only != Some(true))
                .filter_map(|m| {
                    let v = volumes.iter().find(|v| v.name == m.name)?;
                    Some((m.mount_path.clone(), v.host_path.as_ref()?.path.clone()))
                })
                .collect()
        };
        let state_only = writable(&args);
        assert_eq!(state_only.len(), 1, "the state directory: {state_only:?}");
        args.agent.persist = true;
        let mut with = writable(&args);
        with.retain(|m| !state_only.contains(m));
        assert_eq!(
            with,
            [(
                "/host/etc/sysctl.d".to_string(),
                "/etc/sysctl.d".to_string()
            )]
        );
    }

    #[test]
    fn the_host_root_is_mounted_read_only() {
        let ds = render_daemonset(&ControllerContext::new(ControllerArgs::defaults()), vec![]);
        let pod = pod_spec(&ds);
        let vol = volume(pod, "host").host_path.as_ref().expect("host volume");
        assert_eq!(vol.path, "/");
        let m = mount(pod, "host");
        assert_eq!(
            (
                m.mount_path.as_str(),
                m.read_only,
                m.recursive_read_only.as_deref()
            ),
            ("/host", Some(true), Some("IfPossible"))
        );
    }

    #[test]
    fn policy_logs_pull_and_owner_follow_config() {
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        let plain = render_daemonset(&cfg, vec![]);
        let pod = pod_spec(&plain);
        assert!(
            !pod.volumes.iter().flatten().any(|v| v.name == "policy"),
            "no policy: no volume"
        );
        assert!(plain.metadata.owner_references.is_none());
        assert!(pod.image_pull_secrets.is_none());

        cfg.args.agent.policy_configmap = "nodetune-policy".into();
        cfg.args.agent.log_json = true;
        cfg.args.agent.log_level = "debug".into();
        cfg.args.agent.image_pull_policy = "Always".into();
        cfg.args.agent.priority_class = String::new();
        cfg.args.agent.image_pull_secrets = super::super::config::PullSecrets(vec![
            k8s_openapi::api::core::v1::LocalObjectReference {
                name: "regcred".into(),
            },
        ]);
        let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "nodetune-controller".into(),
            uid: "0000-1111".into(),
            ..Default::default()
        };
        cfg.agent_owner = Some(owner.clone());
        let ds = render_daemonset(&cfg, vec![]);
        assert_eq!(ds.metadata.owner_references, Some(vec![owner]));
        let pod = pod_spec(&ds);
        assert!(pod.priority_class_name.is_none(), "empty means none");
        assert_eq!(
            pod.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()),
            Some("regcred")
        );
        let c = &pod.containers[0];
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        let env: BTreeMap<&str, Option<&str>> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            env.get("NODETUNE_POLICY_FILE"),
            Some(&Some("/etc/nodetune/policy/policy.yaml"))
        );
        assert_eq!(env.get("RUST_LOG"), Some(&Some("debug")));
        assert_eq!(env.get("NODETUNE_LOG_JSON"), Some(&Some("true")));
        let vol = volume(pod, "policy")
            .config_map
            .as_ref()
            .expect("policy volume");
        assert_eq!(vol.name, "nodetune-policy");
        let mount = mount(pod, "policy");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (POLICY_DIR, Some(true))
        );
    }

    #[test]
    fn pod_targeting_off_reaches_the_agent_flags() {
        #[derive(clap::Parser)]
        struct Agent {
            #[command(flatten)]
            args: crate::agent::AgentArgs,
        }
        let parse = |cfg: &ControllerContext| {
            let ds = render_daemonset(cfg, vec![]);
            let mut argv = pod_spec(&ds).containers[0].args.clone().unwrap_or_default();
            argv[0] = "nodetune-agent".into();
            argv.push("--node-name=n1".into());
            <Agent as clap::Parser>::try_parse_from(argv).map(|a| a.args.pod_targeting)
        };
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        assert_eq!(parse(&cfg).ok(), Some(true));
        cfg.args.agent.pod_targeting = false;
        assert_eq!(parse(&cfg).ok(), Some(false));
    }

    #[test]
    fn args_follow_config() {
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        cfg.args.agent.interval = std::time::Duration::from_secs(90);
        cfg.args.agent.heartbeat = std::time::Duration::from_secs(300);
        cfg.args.agent.max_unavailable = "2".into();
        let ds = render_daemonset(&cfg, vec![]);
        let args = pod_spec(&ds).containers[0].args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--interval=90s".to_string())
                && args.contains(&"--heartbeat=300s".to_string()),
            "{args:?}"
        );
        let strategy = ds
            .spec
            .and_then(|s| s.update_strategy)
            .and_then(|u| u.rolling_update);
        assert_eq!(
            strategy.and_then(|r| r.max_unavailable),
            Some(IntOrString::Int(2))
        );
    }

    /// Issue 19: narrowed default tolerations must still let the agent onto a node registered
    /// with the startup taint, which only the agent removes.
    #[test]
    fn the_agent_always_tolerates_the_startup_taint() {
        let u = toleration_union(&[tol("y", "1", "NoSchedule")], []);
        assert!(
            u.iter()
                .any(|t| t.key.as_deref() == Some(crate::agent::taint::TAINT_KEY)
                    && t.operator.as_deref() == Some("Exists")
                    && t.effect.as_deref() == Some("NoSchedule")),
            "{u:?}"
        );
    }

    #[test]
    fn profiles_do_not_change_the_template_with_default_tolerations() {
        let cfg = ControllerContext::new(ControllerArgs::defaults());
        let render = |profiles: &[NodeTuningProfile]| {
            serde_json::to_string(&render_daemonset(
                &cfg,
                toleration_union(&cfg.args.agent.default_tolerations.0, profiles),
            ))
            .expect("json")
        };
        let none = render(&[]);
        let a = NodeTuningProfile::test("a")
            .tolerating(vec![tol("dedicated", "db", "NoSchedule")])
            .with_sysctls(&[("vm.swappiness", "10")]);
        let mut a2 = a.clone();
        a2.spec
            .sysctls
            .insert("net.core.somaxconn".into(), "4096".into());
        a2.spec.node_selector = crate::selector::from_pairs(&["role=db".into()]).expect("selector");
        assert_eq!(render(std::slice::from_ref(&a)), none);
        assert_eq!(render(&[a2]), none);
    }

    #[test]
    fn union_without_tolerate_all_is_sorted_and_deduplicated() {
        let defaults = vec![tol("z", "1", "NoSchedule")];
        let a = NodeTuningProfile::test("a").tolerating(vec![
            tol("b", "1", "NoExecute"),
            tol("a", "1", "NoSchedule"),
        ]);
        let b = NodeTuningProfile::test("b").tolerating(vec![
            tol("a", "1", "NoSchedule"),
            Toleration {
                operator: None,
                ..tol("b", "1", "NoExecute")
            },
        ]);
        let u1 = toleration_union(&defaults, [&a, &b]);
        let u2 = toleration_union(&defaults, [&b, &a]);
        assert_eq!(u1, u2, "order of profiles must not matter");
        let keys: Vec<&str> = u1.iter().filter_map(|t| t.key.as_deref()).collect();
        assert_eq!(keys, ["a", "b", crate::agent::taint::TAINT_KEY, "z"]);
        // Editing a profile's sysctls leaves the union alone; a new toleration extends it.
        let mut a_more = a.clone();
        a_more.spec.tolerations.push(tol("c", "1", "NoSchedule"));
        assert_eq!(toleration_union(&defaults, [&a_more, &b]).len(), 5);
    }

    #[test]
    fn tolerate_all_absorbs_the_rest() {
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        let p =
            NodeTuningProfile::test("p").tolerating(vec![all.clone(), tol("x", "1", "NoSchedule")]);
        assert_eq!(
            toleration_union(&[tol("y", "1", "NoSchedule")], [&p]),
            vec![all]
        );
    }

    /// Issue 17, item 3: the metrics port binds where the chart says. `hostIP` takes the
    /// node's address from the downward API; an address is passed as it is (IPv6 bracketed);
    /// authentication is switched on through the environment.
    #[test]
    fn the_metrics_port_binds_where_configured() {
        let env_of =
            |c: &Container, name: &str| c.env.iter().flatten().find(|e| e.name == name).cloned();
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        cfg.args.agent.metrics_bind = "hostIP".parse().expect("hostIP");
        cfg.args.agent.metrics_auth = true;
        let ds = render_daemonset(&cfg, Vec::new());
        let c = &pod_spec(&ds).containers[0];
        let host = env_of(c, "NODETUNE_METRICS_HOST").expect("the node's address");
        assert_eq!(
            host.value_from
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path),
            Some("status.hostIP".to_string())
        );
        assert_eq!(
            env_of(c, "NODETUNE_METRICS_AUTH").and_then(|e| e.value),
            Some("true".to_string())
        );

        cfg.args.agent.metrics_bind = "::".parse().expect("an address");
        cfg.args.agent.metrics_auth = false;
        let ds = render_daemonset(&cfg, Vec::new());
        let c = &pod_spec(&ds).containers[0];
        assert!(
            c.args
                .iter()
                .flatten()
                .any(|a| a == "--metrics-addr=[::]:9477"),
            "{:?}",
            c.args
        );
        assert!(env_of(c, "NODETUNE_METRICS_HOST").is_none());
        assert!(env_of(c, "NODETUNE_METRICS_AUTH").is_none());
        let bad = "eth0".parse::<MetricsBind>().expect_err("not an address");
        assert_eq!(
            bad.to_string(),
            "\"eth0\" is neither `hostIP` nor an IP address"
        );
    }
}

#[cfg(test)]
mod pod_counting_tests {
    use super::*;
    use crate::controller::ControllerArgs;

    #[test]
    fn pod_counting_off_drops_host_pid_and_the_agent_switch() {
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        cfg.args.agent.pod_counting = false;
        cfg.args.agent.pod_targeting = false;
        let ds = render_daemonset(&cfg, Vec::new());
        let pod = super::tests::pod_spec(&ds);
        assert_eq!(pod.host_pid, Some(false));
        let env: Vec<&str> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        assert!(!env.contains(&"NODETUNE_POD_COUNTING"), "{env:?}");
    }

    /// Tuning pods' namespaces finds them through the host's /proc, as counting does.
    #[test]
    fn pod_targeting_alone_keeps_host_pid() {
        let mut cfg = ControllerContext::new(ControllerArgs::defaults());
        cfg.args.agent.pod_counting = false;
        let ds = render_daemonset(&cfg, Vec::new());
        let pod = super::tests::pod_spec(&ds);
        assert_eq!(pod.host_pid, Some(true));
    }
}
