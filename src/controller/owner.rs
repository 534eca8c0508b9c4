//! Resolves `--owner-deployment` to an owner reference for the agent DaemonSet (the UID is only
//! known at run time). Failure is not fatal: the agents then simply have no owner, and
//! `nodetune uninstall` deletes them itself.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, Resource};

use super::config::{ControllerArgs, ControllerContext};

/// The run-time settings: `args`, and the agent owner resolved from `args.owner_deployment`
/// (a GET in `args.namespace`).
pub async fn resolve(args: ControllerArgs, client: &Client) -> ControllerContext {
    let mut settings = ControllerContext::new(args);
    let args = &settings.args;
    if args.owner_deployment.is_empty() {
        return settings;
    }
    let api = Api::<Deployment>::namespaced(client.clone(), &args.namespace);
    match api.get(&args.owner_deployment).await {
        Ok(d) => settings.agent_owner = owner_of(&d),
        Err(e) => tracing::warn!(
            deployment = %args.owner_deployment,
            error = %e,
            "cannot read the owner Deployment; the agent DaemonSet gets no owner"
        ),
    }
    settings
}

/// A non-controller, non-blocking reference (blocking would need `deployments/finalizers`).
pub fn owner_of(d: &Deployment) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Deployment::api_version(&()).into_owned(),
        kind: Deployment::kind(&()).into_owned(),
        name: d.metadata.name.clone()?,
        uid: d.metadata.uid.clone()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn reference_needs_name_and_uid() {
        let mut d = Deployment {
            metadata: ObjectMeta {
                name: Some("nodetune-controller".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(owner_of(&d).is_none());
        d.metadata.uid = Some("u-1".into());
        let o = owner_of(&d).expect("reference");
        assert_eq!(
            (o.api_version.as_str(), o.kind.as_str(), o.uid.as_str()),
            ("apps/v1", "Deployment", "u-1")
        );
        assert_eq!(o.block_owner_deletion, None);
    }
}
