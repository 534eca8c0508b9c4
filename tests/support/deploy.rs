//! nodetune deployed as shipped: the CRDs, then deploy/nodetune.yaml (the chart rendered with
//! defaults) with the controller Deployment held back, so a test can shorten intervals or pin
//! the image before creating it.
use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar};
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;

use super::{Cluster, kubectl};

/// The namespace deploy/nodetune.yaml installs into.
pub const NAMESPACE: &str = "nodetune-system";

/// Applies nodetune's CRDs (crds/) and waits until the API server has established them.
pub async fn apply_crds(cluster: &Cluster) -> anyhow::Result<()> {
    let crds = super::repo_root().join("crds");
    kubectl(cluster, &["apply", "-f", &crds.to_string_lossy()]).await?;
    let established = [
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ];
    kubectl(cluster, &established).await?;
    Ok(())
}

/// Applies the CRDs (waiting until they are established) and everything in
/// deploy/nodetune.yaml but the controller Deployment, which is returned.
pub async fn apply_all_but_controller(cluster: &Cluster) -> anyhow::Result<Deployment> {
    let root = super::repo_root();
    apply_crds(cluster).await?;
    let text = std::fs::read_to_string(root.join("deploy/nodetune.yaml"))?;
    let mut rest = Vec::new();
    let mut deploy: Option<Deployment> = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        if v["kind"].as_str() == Some("Deployment") {
            deploy = Some(serde_yaml::from_value(v)?);
        } else {
            rest.push(serde_yaml::to_string(&v)?);
        }
    }
    let deploy = deploy.context("deploy/nodetune.yaml has the controller Deployment")?;
    let rest_file = cluster.dir().join("nodetune-without-deployment.yaml");
    std::fs::write(&rest_file, rest.join("---\n"))?;
    kubectl(cluster, &["apply", "-f", &rest_file.to_string_lossy()]).await?;
    Ok(deploy)
}

/// The controller container of the Deployment.
pub fn controller_container(deploy: &mut Deployment) -> anyhow::Result<&mut Container> {
    deploy
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .and_then(|s| s.containers.first_mut())
        .context("deployment has a container")
}

/// Agent intervals, debounce and finalizer timeout short enough for a test.
pub fn short_intervals(deploy: &mut Deployment) -> anyhow::Result<()> {
    set_env(
        controller_container(deploy)?,
        &[
            ("NODETUNE_AGENT_INTERVAL", "2s"),
            ("NODETUNE_AGENT_HEARTBEAT", "4s"),
            ("NODETUNE_DEBOUNCE", "200ms"),
            ("NODETUNE_FINALIZER_TIMEOUT", "120s"),
            ("NODETUNE_STATUS_TELEMETRY_INTERVAL", "1s"),
        ],
    );
    Ok(())
}

/// Sets (replacing) environment variables of a container.
pub fn set_env(container: &mut Container, vars: &[(&str, &str)]) {
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|e| !vars.iter().any(|(k, _)| e.name == *k));
    env.extend(vars.iter().map(|(k, v)| EnvVar {
        name: k.to_string(),
        value: Some(v.to_string()),
        ..Default::default()
    }));
}

/// Creates the (adjusted) controller Deployment.
pub async fn create_controller(cluster: &Cluster, deploy: &Deployment) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(cluster.client(), NAMESPACE)
        .create(&PostParams::default(), deploy)
        .await?;
    Ok(())
}
