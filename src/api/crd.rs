//! The CRD manifests as YAML, generated from the types (never edited by hand).
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{NodeTuningProfile, NodeTuningReport};

/// Both CRDs, profile first.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![NodeTuningProfile::crd(), NodeTuningReport::crd()]
}

/// File name under `crds/` for a CRD (`<plural>.<group>.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as YAML.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// All CRDs as one multi-document YAML stream, as `nodetune crd` prints it.
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    let docs = all().iter().map(to_yaml).collect::<Result<Vec<_>, _>>()?;
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
}
