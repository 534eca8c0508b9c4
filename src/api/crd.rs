//! The CRD manifests as YAML, generated from the types (never edited by hand).
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{NodeTuningProfile, NodeTuningReport};

/// Both CRDs, profile first.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        flowing_descriptions(NodeTuningProfile::crd()),
        flowing_descriptions(NodeTuningReport::crd()),
    ]
}

/// Joins the lines of every description into flowing text: doc comments are wrapped at 100
/// columns, and `kubectl explain` wraps again, so a kept line break would cut sentences in two.
/// Paragraph breaks (blank lines) and list items (`* `, `- `) keep their line break.
fn flowing_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    unwrap_descriptions(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(s) if key == "description" => *s = flow(s),
                    _ => unwrap_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// `text` with each line break inside a paragraph turned into a space.
pub fn flow(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        if let Some(next) = lines.peek() {
            let keep = line.trim().is_empty()
                || next.trim().is_empty()
                || next.trim_start().starts_with("* ")
                || next.trim_start().starts_with("- ");
            out.push(if keep { '\n' } else { ' ' });
        }
    }
    out
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
