//! Reading NodeTuningProfile manifests (the same YAML `kubectl apply` takes), pure.
use serde::Deserialize;

use crate::api::NodeTuningProfile;
use crate::api::profile::{MAX_SYSCTLS, PRIORITY_MAX, PRIORITY_MIN};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        doc: usize,
        source: serde_yaml::Error,
    },
    #[error(
        "document {doc}: apiVersion {api_version:?} kind {kind:?} is not a nodetune.dev/v1alpha1 NodeTuningProfile"
    )]
    WrongKind {
        doc: usize,
        api_version: String,
        kind: String,
    },
    #[error("document {doc} ({name}): {field}: {message}")]
    Invalid {
        doc: usize,
        name: String,
        field: &'static str,
        message: String,
    },
    #[error("no NodeTuningProfile in the input")]
    Empty,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Every profile in a (multi-document) YAML stream. Empty documents are skipped; anything else
/// that is not a NodeTuningProfile is an error rather than silently ignored.
pub fn parse_profiles(text: &str) -> Result<Vec<NodeTuningProfile>, ManifestError> {
    let mut profiles = Vec::new();
    for (idx, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = idx + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            doc: doc_no,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta =
            serde_yaml::from_value(value.clone()).map_err(|source| ManifestError::Yaml {
                doc: doc_no,
                source,
            })?;
        if meta.api_version != "nodetune.dev/v1alpha1" || meta.kind != "NodeTuningProfile" {
            return Err(ManifestError::WrongKind {
                doc: doc_no,
                api_version: meta.api_version,
                kind: meta.kind,
            });
        }
        let profile: NodeTuningProfile =
            serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml {
                doc: doc_no,
                source,
            })?;
        check_bounds(doc_no, &profile)?;
        profiles.push(profile);
    }
    if profiles.is_empty() {
        return Err(ManifestError::Empty);
    }
    Ok(profiles)
}

/// The object-level bounds admission enforces. Per-key rules (grammar, denylist, values) are
/// left to planning, which reports each bad key while the others still apply.
fn check_bounds(doc: usize, p: &NodeTuningProfile) -> Result<(), ManifestError> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let invalid = |field, message: String| ManifestError::Invalid {
        doc,
        name: name.clone(),
        field,
        message,
    };
    if name.is_empty() {
        return Err(invalid("metadata.name", "is required".into()));
    }
    let n = p.spec.sysctls.len();
    if n == 0 || n > MAX_SYSCTLS {
        return Err(invalid(
            "spec.sysctls",
            format!("must have 1 to {MAX_SYSCTLS} entries, has {n}"),
        ));
    }
    if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&p.spec.priority) {
        return Err(invalid(
            "spec.priority",
            format!(
                "{} is outside {PRIORITY_MIN}..={PRIORITY_MAX}",
                p.spec.priority
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Mode;

    #[test]
    fn reads_examples_with_defaults() {
        let text = "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: a}\nspec:\n  sysctls: {net.ipv4.tcp_fin_timeout: \"30\"}\n---\n---\napiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: b}\nspec: {priority: 5, mode: DryRun, restoreOnRemoval: false, sysctls: {vm.swappiness: \"10\"}}\n";
        let ps = parse_profiles(text).expect("valid");
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].spec.mode, Mode::Enforce);
        assert!(
            ps[0].spec.restore_on_removal,
            "restoreOnRemoval defaults to true"
        );
        assert_eq!(ps[1].spec.priority, 5);
        assert_eq!(ps[1].spec.mode, Mode::DryRun);
        assert!(!ps[1].spec.restore_on_removal);
    }

    #[test]
    fn refuses_other_kinds_and_bounds() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        assert!(matches!(
            parse_profiles(cm),
            Err(ManifestError::WrongKind { doc: 1, .. })
        ));
        let prio = "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: a}\nspec: {priority: 5000, sysctls: {vm.swappiness: \"1\"}}\n";
        let err = parse_profiles(prio)
            .expect_err("priority out of range")
            .to_string();
        assert!(err.contains("spec.priority"), "{err}");
        let empty = "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: a}\nspec: {sysctls: {}}\n";
        assert!(
            parse_profiles(empty)
                .expect_err("no sysctls")
                .to_string()
                .contains("spec.sysctls")
        );
        let mode = "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: a}\nspec: {mode: Sometimes, sysctls: {vm.swappiness: \"1\"}}\n";
        assert!(matches!(
            parse_profiles(mode),
            Err(ManifestError::Yaml { .. })
        ));
        assert!(matches!(parse_profiles(""), Err(ManifestError::Empty)));
    }

    #[test]
    fn shipped_examples_parse() {
        for f in ["web-server.yaml", "caching-proxy.yaml", "mail-server.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/examples")
                .join(f);
            let text = std::fs::read_to_string(&path).expect("example readable");
            let ps = parse_profiles(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
            let merged = crate::plan::merge(ps.iter());
            assert!(merged.rejected.is_empty(), "{f}: {:?}", merged.rejected);
        }
    }
}
