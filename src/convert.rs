//! sysctl.conf → NodeTuningProfile manifest(s), pure. The caller adds warnings that need the
//! kernel.
//!
//! Every manifest this produces is one `nodetune plan` and the apiserver accept: a line that
//! could not be carried over faithfully is left out and [`ParsedConf::skipped`] says why, line
//! by line, instead of the whole file failing or a bad value slipping through.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::profile::{MAX_SYSCTLS, MAX_VALUE_LEN};
use crate::api::{NodeTuningProfile, NodeTuningProfileSpec};
use crate::sysctl::key::{self, SysctlKey};
use crate::sysctl::policy::Policy;

/// Largest sysctl.conf read.
pub const MAX_CONF_BYTES: usize = 4 << 20;
/// Longest `metadata.name` (a DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// One `key = value` line that made it through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfEntry {
    pub line: usize,
    pub key: SysctlKey,
    /// Written with a leading `-` (sysctl.d(5): ignore failures); kept in the profile.
    pub optional: bool,
    pub value: String,
}

impl ConfEntry {
    /// The key as the profile writes it (with the `-` marker if optional).
    pub fn spec_key(&self) -> String {
        key::spec_string(&self.key, self.optional)
    }
}

/// A line left out of the profile, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} left out: {}", self.line, self.reason)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedConf {
    /// In line order, one per key (the last line for a key wins, as with `sysctl -p`).
    pub entries: Vec<ConfEntry>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("input is {len} bytes; at most {MAX_CONF_BYTES} are accepted")]
    TooLarge { len: usize },
    #[error(
        "invalid --name {name:?}: {reason} (a profile name is a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most {MAX_NAME_LEN} characters)"
    )]
    BadName { name: String, reason: &'static str },
}

/// Parse sysctl.conf(5)/sysctl.d(5) text: `key = value` or `key=value`, `#` and `;` comment
/// lines, a `-` prefix (the key may be missing: kept as an optional key), and later lines
/// overriding earlier ones as `sysctl -p` does. Every line that cannot be carried over is
/// reported in [`ParsedConf::skipped`]; `policy` decides which keys and values are allowed.
pub fn parse_sysctl_conf(text: &str, policy: &Policy) -> Result<ParsedConf, ConvertError> {
    if text.len() > MAX_CONF_BYTES {
        return Err(ConvertError::TooLarge { len: text.len() });
    }
    let mut parsed = ParsedConf::default();
    let mut by_key: BTreeMap<SysctlKey, ConfEntry> = BTreeMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let mut skip = |reason: String| parsed.skipped.push(Skipped { line, reason });
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let Some((k, v)) = trimmed.split_once('=') else {
            skip(format!("expected `key = value`, found {:?}", clip(trimmed)));
            continue;
        };
        let key_text = k.trim();
        if key_text.contains('*') {
            skip(format!(
                "{:?} is a glob; a profile lists each key (e.g. net.ipv4.conf.all.rp_filter and net.ipv4.conf.default.rp_filter)",
                clip(key_text)
            ));
            continue;
        }
        let (key, optional) = match key::parse_spec(key_text) {
            Ok(k) => k,
            Err(e) => {
                skip(e.to_string());
                continue;
            }
        };
        let mut value = v.trim();
        // sysctl(8) would pass a trailing comment to the kernel as part of the value, which the
        // kernel then refuses; the author meant a comment.
        if let Some(at) = comment_start(value) {
            value = value[..at].trim_end();
            parsed.warnings.push(format!(
                "line {line}: trailing comment after the value of {key} left out of the value"
            ));
        }
        if value.is_empty() {
            skip(format!("{key} has an empty value"));
            continue;
        }
        if value.len() > MAX_VALUE_LEN {
            skip(format!(
                "the value of {key} is {} bytes; at most {MAX_VALUE_LEN} are allowed",
                value.len()
            ));
            continue;
        }
        if let Err(refusal) = policy.check(&key, value) {
            skip(refusal.message);
            continue;
        }
        let entry = ConfEntry {
            line,
            key: key.clone(),
            optional,
            value: value.to_string(),
        };
        if let Some(first) = by_key.insert(key.clone(), entry) {
            parsed.warnings.push(format!(
                "line {line}: {key} was already set on line {}; the later value wins, as with sysctl -p",
                first.line
            ));
        }
    }
    parsed.entries = by_key.into_values().collect();
    parsed.entries.sort_by_key(|e| e.line);
    Ok(parsed)
}

/// Where a ` #` or `\t#` comment starts in a value, if any.
fn comment_start(value: &str) -> Option<usize> {
    let bytes = value.as_bytes();
    (1..bytes.len()).find(|&i| bytes[i] == b'#' && (bytes[i - 1] == b' ' || bytes[i - 1] == b'\t'))
}

/// At most 80 characters of `s`, for messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Checks a profile name the way the apiserver does (DNS-1123 subdomain).
pub fn check_name(name: &str) -> Result<(), ConvertError> {
    let bad = |reason| {
        Err(ConvertError::BadName {
            name: clip(name),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is too long");
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.chars().all(|c| ok_char(c) || c == '-' || c == '.') {
        return bad("it has a character other than a-z, 0-9, '-' and '.'");
    }
    if name
        .split('.')
        .any(|label| label.is_empty() || !label.starts_with(ok_char) || !label.ends_with(ok_char))
    {
        return bad("each dot-separated part must start and end with a letter or digit");
    }
    Ok(())
}

/// Builds the profiles: one per [`MAX_SYSCTLS`] keys (`name`, `name-2`, ...), since admission
/// refuses a bigger one. Fails if a name (with its suffix) is not a valid profile name.
pub fn to_profiles(
    name: &str,
    selector: Option<LabelSelector>,
    entries: &[ConfEntry],
) -> Result<Vec<NodeTuningProfile>, ConvertError> {
    let chunks: Vec<&[ConfEntry]> = if entries.is_empty() {
        vec![entries]
    } else {
        entries.chunks(MAX_SYSCTLS).collect()
    };
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let name = if i == 0 {
                name.to_string()
            } else {
                format!("{name}-{}", i + 1)
            };
            check_name(&name)?;
            Ok(NodeTuningProfile::new(
                &name,
                NodeTuningProfileSpec {
                    node_selector: selector.clone(),
                    sysctls: chunk
                        .iter()
                        .map(|e| (e.spec_key(), e.value.clone()))
                        .collect(),
                    restore_on_removal: true,
                    ..Default::default()
                },
            ))
        })
        .collect()
}

/// A YAML (or JSON) string literal that every YAML 1.1 and 1.2 reader takes as that string:
/// JSON's double-quoted form, so `yes`, `on`, `1:20` or `0x10` never turn into booleans or
/// numbers.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Renders profiles as a multi-document YAML stream in which every string is quoted.
pub fn render(profiles: &[NodeTuningProfile]) -> String {
    let mut out = String::new();
    for p in profiles {
        out.push_str(
            "---\napiVersion: nodetune.dev/v1alpha1\nkind: NodeTuningProfile\nmetadata:\n",
        );
        out.push_str(&format!(
            "  name: {}\nspec:\n",
            quoted(p.metadata.name.as_deref().unwrap_or_default())
        ));
        if let Some(sel) = &p.spec.node_selector {
            // JSON is YAML flow style, with every string quoted.
            let json = serde_json::to_string(sel).unwrap_or_else(|_| "{}".into());
            out.push_str(&format!("  nodeSelector: {json}\n"));
        }
        out.push_str(&format!(
            "  restoreOnRemoval: {}\n  sysctls:\n",
            p.spec.restore_on_removal
        ));
        for (k, v) in &p.spec.sysctls {
            out.push_str(&format!("    {}: {}\n", quoted(k), quoted(v)));
        }
    }
    out
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

    fn parse(text: &str) -> ParsedConf {
        parse_sysctl_conf(text, &Policy::default()).expect("parsed")
    }

    #[test]
    fn parses_all_forms_and_later_wins() {
        let parsed = parse(CONF);
        let got: Vec<(String, String)> = parsed
            .entries
            .iter()
            .map(|e| (e.spec_key(), e.value.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("net.ipv4.tcp_syncookies".into(), "1".into()),
                ("net.ipv4.tcp_tw_reuse".into(), "1".into()),
                ("-net.ipv4.tcp_tw_recycle".into(), "1".into()),
                (
                    "net.ipv4.ip_local_port_range".into(),
                    "1024    65000".into()
                ),
                ("net.ipv4.tcp_fin_timeout".into(), "30".into()),
            ]
        );
        assert!(parsed.skipped.is_empty());
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("line 8") && parsed.warnings[0].contains("line 7"));
    }

    /// Defect 10: each line that cannot be carried over is left out with its reason; the rest
    /// of the file still converts.
    #[test]
    fn bad_lines_are_left_out_with_a_reason() {
        let text = "net.ipv4.tcp_fin_timeout\nNet..x = 1\nvm.swappiness =\n\
                    net.ipv4.conf.*.rp_filter = 1\nkernel.core_pattern = |/bin/sh\n\
                    kernel.randomize_va_space = 0\nnet.ipv4.tcp_syncookies = 1 # on\n\
                    net.core.somaxconn = a\u{1b}b\nnet.ipv4.tcp_tw_reuse = 1\n";
        let parsed = parse(text);
        let lines: Vec<usize> = parsed.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5, 6, 8], "{:?}", parsed.skipped);
        let all = parsed
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "key = value",
            "glob",
            "empty value",
            "core_pattern",
            "allowWeakening",
            "control",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        let keys: Vec<String> = parsed.entries.iter().map(|e| e.spec_key()).collect();
        assert_eq!(keys, ["net.ipv4.tcp_syncookies", "net.ipv4.tcp_tw_reuse"]);
        assert_eq!(parsed.entries[0].value, "1", "trailing comment stripped");
    }

    #[test]
    fn names_are_checked_and_big_files_split() {
        for bad in ["", "Web", "web_1", "-web", "web.", "a..b", &"a".repeat(254)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["web", "web-1", "a.b", "0"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        let text: String = (0..600).map(|i| format!("net.ipv4.k{i} = {i}\n")).collect();
        let parsed = parse(&text);
        let profiles = to_profiles("big", None, &parsed.entries).expect("valid");
        let names: Vec<&str> = profiles
            .iter()
            .map(|p| p.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(names, ["big", "big-2", "big-3"]);
        assert!(profiles.iter().all(|p| p.spec.sysctls.len() <= MAX_SYSCTLS));
        let back = crate::manifest::parse_profiles(&render(&profiles)).expect("accepted");
        assert_eq!(
            back.iter().map(|p| p.spec.sysctls.len()).sum::<usize>(),
            600
        );
    }

    /// Defect 10: YAML 1.1 readers (kubectl) must read the same strings.
    #[test]
    fn every_string_is_quoted() {
        let parsed = parse(
            "net.ipv4.a = yes\nnet.ipv4.b = on\nnet.ipv4.c = 1:20\nnet.ipv4.d = 0x10\nnet.ipv4.e = ~\n",
        );
        let sel = crate::selector::from_pairs(&["role=yes".into()]).expect("pair");
        let profiles = to_profiles("web", sel, &parsed.entries).expect("valid");
        let yaml = render(&profiles);
        for line in [
            "\"net.ipv4.a\": \"yes\"",
            "\"net.ipv4.b\": \"on\"",
            "\"net.ipv4.c\": \"1:20\"",
            "\"net.ipv4.e\": \"~\"",
            "\"role\":\"yes\"",
        ] {
            assert!(yaml.contains(line), "{line} in\n{yaml}");
        }
        let back = crate::manifest::parse_profiles(&yaml).expect("parse back");
        assert_eq!(back[0].spec.sysctls["net.ipv4.c"], "1:20");
        assert!(back[0].spec.restore_on_removal);
    }

    /// Found by the `sysctl_conf` fuzz target: a C1 control character (U+0091) in a value made
    /// convert write YAML that no reader accepts.
    #[test]
    fn c1_control_characters_are_left_out() {
        let parsed = parse("net.ipv4.a = 1\u{91}0\nnet.ipv4.b = 1\n");
        assert_eq!(parsed.skipped.len(), 1, "{:?}", parsed.skipped);
        let profiles = to_profiles("web", None, &parsed.entries).expect("valid");
        crate::manifest::parse_profiles(&render(&profiles)).expect("readable");
    }

    /// Found by the `sysctl_conf` fuzz target: a value with a quote and many braces, which the
    /// manifest reader's nesting scan took for flow nesting.
    #[test]
    fn quoted_braces_in_values_are_read_back() {
        let value = format!("\"102ernc# ].x{}", "{".repeat(40));
        let parsed = parse(&format!("net.ipv4.a = {value}\n"));
        let profiles = to_profiles("web", None, &parsed.entries).expect("valid");
        let back = crate::manifest::parse_profiles(&render(&profiles)).expect("readable");
        assert_eq!(
            back[0].spec.sysctls["net.ipv4.a"],
            "\"102ernc# ].x{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{"
        );
    }

    #[test]
    fn huge_input_is_refused() {
        let text = "#".repeat(MAX_CONF_BYTES + 1);
        assert!(matches!(
            parse_sysctl_conf(&text, &Policy::default()),
            Err(ConvertError::TooLarge { .. })
        ));
    }
}
