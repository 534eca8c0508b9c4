//! sysctl.conf → NodeTuningProfile, pure. The caller adds warnings that need the kernel.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{NodeTuningProfile, NodeTuningProfileSpec};
use crate::sysctl::key::SysctlKey;

/// One `key = value` line that made it through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfEntry {
    pub line: usize,
    pub key: SysctlKey,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedConf {
    pub entries: Vec<ConfEntry>,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("line {line}: expected `key = value`, found {text:?}")]
    NotAssignment { line: usize, text: String },
    #[error("line {line}: {source}")]
    BadKey {
        line: usize,
        source: crate::sysctl::key::KeyError,
    },
    #[error("line {line}: key {key} has an empty value")]
    EmptyValue { line: usize, key: String },
    #[error("the file sets no sysctl")]
    Empty,
}

/// Parse sysctl.conf(5) text: `key = value` or `key=value`, `#` and `;` comments, a `-` prefix
/// (ignore failures), and later lines overriding earlier ones as `sysctl -p` does.
/// Every malformed line is reported, not just the first.
pub fn parse_sysctl_conf(text: &str) -> Result<ParsedConf, Vec<ConvertError>> {
    let mut parsed = ParsedConf::default();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let Some((k, v)) = trimmed.split_once('=') else {
            errors.push(ConvertError::NotAssignment {
                line,
                text: trimmed.to_string(),
            });
            continue;
        };
        let mut key_text = k.trim();
        if let Some(rest) = key_text.strip_prefix('-') {
            key_text = rest.trim_start();
            parsed.warnings.push(format!(
                "line {line}: the '-' prefix (ignore failures) has no equivalent: nodetune reports a failing key and still applies the others"
            ));
        }
        let value = v.trim().to_string();
        let key = match SysctlKey::parse(key_text) {
            Ok(key) => key,
            Err(source) => {
                errors.push(ConvertError::BadKey { line, source });
                continue;
            }
        };
        if value.is_empty() {
            errors.push(ConvertError::EmptyValue {
                line,
                key: key.to_string(),
            });
            continue;
        }
        if let Some(first) = seen.insert(key.to_string(), line) {
            parsed.warnings.push(format!(
                "line {line}: {key} was already set on line {first}; the later value wins, as with sysctl -p"
            ));
            parsed.entries.retain(|e| e.key != key);
        }
        parsed.entries.push(ConfEntry { line, key, value });
    }
    if errors.is_empty() && parsed.entries.is_empty() {
        errors.push(ConvertError::Empty);
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// Build the profile manifest; keys in the canonical dotted form.
pub fn to_profile(
    name: &str,
    selector: Option<LabelSelector>,
    entries: &[ConfEntry],
) -> NodeTuningProfile {
    let sysctls = entries
        .iter()
        .map(|e| (e.key.to_string(), e.value.clone()))
        .collect();
    NodeTuningProfile::new(
        name,
        NodeTuningProfileSpec {
            node_selector: selector,
            sysctls,
            restore_on_removal: true,
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "\
# classic web server tuning
net.ipv4.tcp_syncookies = 1
net.ipv4.tcp_tw_reuse=1
; old advice
-net.ipv4.tcp_tw_recycle = 1
net.ipv4.ip_local_port_range = 1024    65000
net.ipv4.tcp_fin_timeout = 60
net.ipv4.tcp_fin_timeout = 30
";

    #[test]
    fn parses_all_forms_and_later_wins() {
        let parsed = parse_sysctl_conf(CONF).expect("valid conf");
        let got: Vec<(String, String)> = parsed
            .entries
            .iter()
            .map(|e| (e.key.to_string(), e.value.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("net.ipv4.tcp_syncookies".into(), "1".into()),
                ("net.ipv4.tcp_tw_reuse".into(), "1".into()),
                ("net.ipv4.tcp_tw_recycle".into(), "1".into()),
                (
                    "net.ipv4.ip_local_port_range".into(),
                    "1024    65000".into()
                ),
                ("net.ipv4.tcp_fin_timeout".into(), "30".into()),
            ]
        );
        assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("line 5"));
        assert!(parsed.warnings[1].contains("line 8") && parsed.warnings[1].contains("line 7"));
    }

    #[test]
    fn reports_every_bad_line() {
        let errs = parse_sysctl_conf("net.ipv4.tcp_fin_timeout\nNet..x = 1\nvm.swappiness =\n")
            .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(matches!(
            errs[0],
            ConvertError::NotAssignment { line: 1, .. }
        ));
        assert!(matches!(errs[1], ConvertError::BadKey { line: 2, .. }));
        assert!(matches!(errs[2], ConvertError::EmptyValue { line: 3, .. }));
    }

    #[test]
    fn empty_file_is_an_error() {
        assert_eq!(
            parse_sysctl_conf("# nothing\n\n").unwrap_err(),
            vec![ConvertError::Empty]
        );
    }

    #[test]
    fn profile_round_trips_through_yaml() {
        let parsed = parse_sysctl_conf(CONF).expect("valid conf");
        let sel = crate::selector::from_pairs(&["role=web".into()]).expect("pair");
        let profile = to_profile("web", sel, &parsed.entries);
        let yaml = serde_yaml::to_string(&profile).expect("yaml");
        assert!(yaml.contains("apiVersion: nodetune.dev/v1alpha1"), "{yaml}");
        assert!(yaml.contains("kind: NodeTuningProfile"), "{yaml}");
        let back: NodeTuningProfile = serde_yaml::from_str(&yaml).expect("parse back");
        assert_eq!(back.spec.sysctls.len(), 5);
        assert_eq!(back.spec.sysctls["net.ipv4.tcp_fin_timeout"], "30");
        assert!(back.spec.restore_on_removal);
    }
}
