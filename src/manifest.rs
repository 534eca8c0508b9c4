//! Reading NodeTuningProfile manifests (the same YAML `kubectl apply` takes), pure.
//!
//! As strict as the apiserver: an unknown field (`modee: DryRun`) is refused and named, rather
//! than ignored so that the profile silently applies in Enforce mode. Input is bounded before it
//! is parsed: at most [`MAX_MANIFEST_BYTES`] and [`MAX_NESTING`] levels of flow brackets, so a
//! hostile file is refused at once instead of costing minutes of CPU.
use serde::Deserialize;

use crate::api::NodeTuningProfile;
use crate::api::profile::{MAX_SYSCTLS, PRIORITY_MAX, PRIORITY_MIN};

/// Largest manifest read (the apiserver's own request limit is 3 MiB).
pub const MAX_MANIFEST_BYTES: usize = 3 << 20;
/// Deepest nesting of `[`/`{` accepted; a profile needs 4.
pub const MAX_NESTING: usize = 32;
/// Deepest block indentation accepted, in columns; a profile needs about 10.
pub const MAX_INDENT: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("input is {len} bytes; at most {MAX_MANIFEST_BYTES} are accepted")]
    TooLarge { len: usize },
    #[error(
        "line {line}: nested more than {MAX_NESTING} levels deep (or indented more than {MAX_INDENT} columns); not a NodeTuningProfile"
    )]
    TooDeep { line: usize },
    #[error("document {doc} ({name}): unknown field {field} (the apiserver refuses it too)")]
    UnknownField {
        doc: usize,
        name: String,
        field: String,
    },
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
    check_shape(text)?;
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
        let mut unknown = Vec::new();
        let profile: NodeTuningProfile = serde_ignored::deserialize(value, |path| {
            // The derived type skips its type meta, which was checked above.
            // `?` marks an Option level in serde_ignored's paths; people think in field names.
            let path = path.to_string().replace(".?", "");
            if path != "apiVersion" && path != "kind" {
                unknown.push(path);
            }
        })
        .map_err(|source| ManifestError::Yaml {
            doc: doc_no,
            source,
        })?;
        if let Some(field) = unknown.into_iter().next() {
            return Err(ManifestError::UnknownField {
                doc: doc_no,
                name: profile.metadata.name.clone().unwrap_or_default(),
                field,
            });
        }
        check_bounds(doc_no, &profile)?;
        profiles.push(profile);
    }
    if profiles.is_empty() {
        return Err(ManifestError::Empty);
    }
    Ok(profiles)
}

/// Refuses input too large or too deeply nested to be a profile, before the YAML parser sees
/// it (its cost grows faster than linearly with nesting).
pub fn check_shape(text: &str) -> Result<(), ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { len: text.len() });
    }
    crate::sysctl::input::check_yaml_nesting(text, MAX_NESTING, MAX_INDENT)
        .map_err(|line| ManifestError::TooDeep { line })
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

    const HEAD: &str =
        "apiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata: {name: a}\n";

    /// Defect 6: unknown fields are refused and named, at any level.
    #[test]
    fn unknown_fields_are_refused_by_name() {
        for (spec, field) in [
            (
                "spec: {modee: DryRun, sysctls: {vm.swappiness: \"1\"}}",
                "spec.modee",
            ),
            (
                "spec: {sysctl: {vm.swappiness: \"1\"}, sysctls: {vm.a: \"1\"}}",
                "spec.sysctl",
            ),
            ("spec: {sysctls: {vm.a: \"1\"}}\nstatuss: {}", "statuss"),
            (
                "spec: {sysctls: {vm.a: \"1\"}, nodeSelector: {matchLabel: {a: b}}}",
                "spec.nodeSelector.matchLabel",
            ),
        ] {
            let err = parse_profiles(&format!("{HEAD}{spec}\n")).expect_err(spec);
            assert!(
                matches!(&err, ManifestError::UnknownField { field: f, .. } if f == field),
                "{spec}: {err}"
            );
            assert!(err.to_string().contains(field), "{err}");
        }
        let err = parse_profiles(
            &format!("{HEAD}spec: {{sysctls: {{vm.a: \"1\"}}}}\n")
                .replace("metadata: {name: a}", "metadata: {name: a, labelz: {}}"),
        )
        .expect_err("metadata typo");
        assert!(err.to_string().contains("metadata.labelz"), "{err}");
    }

    /// Defect 7: pathological input is refused before parsing, fast.
    #[test]
    fn deep_or_huge_input_is_refused_before_parsing() {
        let deep = format!(
            "{HEAD}spec: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let start = std::time::Instant::now();
        assert!(matches!(
            parse_profiles(&deep),
            Err(ManifestError::TooDeep { line: 4 })
        ));
        let indented: String = (0..200)
            .map(|i| format!("{}a{i}:\n", " ".repeat(i)))
            .collect();
        assert!(matches!(
            parse_profiles(&indented),
            Err(ManifestError::TooDeep { .. })
        ));
        let huge = "#".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(matches!(
            parse_profiles(&huge),
            Err(ManifestError::TooLarge { .. })
        ));
        // brackets inside quotes and comments do not count
        let quoted = format!(
            "{HEAD}spec:\n  sysctls: {{vm.a: \"{}\"}} # {}\n",
            "[".repeat(100),
            "{".repeat(100)
        );
        assert!(check_shape(&quoted).is_ok());
        eprintln!("refused in {:?}", start.elapsed());
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
