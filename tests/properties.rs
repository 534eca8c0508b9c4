//! Property tests (proptest, stable toolchain) for the parsers that read untrusted input; the
//! same properties are fuzzed by `scripts/fuzz` on nightly.
use nodetune::convert;
use nodetune::sysctl::key::{self, KEY_MAX_LEN, KEY_PATTERN, SysctlKey};
use nodetune::sysctl::{Policy, value};
use proptest::prelude::*;

/// Strings near the key grammar: its alphabet, separators, the marker and a few strays.
fn key_like() -> impl Strategy<Value = String> {
    proptest::string::string_regex("-?[a-z0-9_./:A-Z-]{0,40}").expect("strategy")
}

/// Mostly valid keys, in both forms, some optional, some denied or weakening.
fn plausible_key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(
            "-?(net|vm|kernel|fs)[./][a-z0-9_]{1,10}([./][a-z0-9_-]{1,8}){0,2}"
        )
        .expect("strategy"),
        Just("kernel.core_pattern".to_string()),
        Just("kernel.randomize_va_space".to_string()),
        Just("net.ipv4.conf.*.rp_filter".to_string()),
    ]
}

fn conf_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("# comment".to_string()),
        (plausible_key(), "[ -~\t\u{1b}]{0,20}").prop_map(|(k, v)| format!("{k} = {v}")),
        (plausible_key(), "[0-9yesno: ]{1,12}").prop_map(|(k, v)| format!("{k}={v}")),
        (key_like(), "[ -~\t\u{1b}]{0,20}").prop_map(|(k, v)| format!("{k} = {v}")),
        (key_like(), "[0-9 ]{1,12}", "[ -~]{0,10}").prop_map(|(k, v, c)| format!("{k}={v} #{c}")),
        "[ -~]{0,30}",
    ]
}

proptest! {
    // No regression files in the source tree; a failure prints its minimal input.
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// The parser and the CRD's pattern agree, and the canonical form parses back.
    #[test]
    fn key_parser_agrees_with_pattern(raw in key_like()) {
        let re = regex::Regex::new(KEY_PATTERN).expect("pattern");
        let parsed = key::parse_spec(&raw);
        if raw.strip_prefix('-').unwrap_or(&raw).len() <= KEY_MAX_LEN {
            prop_assert_eq!(parsed.is_ok(), re.is_match(&raw), "{:?}", raw);
        }
        if let Ok((k, optional)) = parsed {
            prop_assert_eq!(SysctlKey::parse(&k.dotted()).expect("canonical"), k.clone());
            prop_assert_eq!(key::parse_spec(&key::spec_string(&k, optional)).expect("spec"), (k, optional));
        }
    }

    /// Defect 10: whatever the input, what convert writes is read back by the manifest reader
    /// with no key rejected and every value passing the engine's checks.
    #[test]
    fn convert_output_is_always_accepted(lines in proptest::collection::vec(conf_line(), 0..30)) {
        let text = lines.join("\n");
        let parsed = convert::parse_sysctl_conf(&text, &Policy::default()).expect("small input");
        prop_assume!(!parsed.entries.is_empty());
        let profiles = convert::to_profiles("prop", None, &parsed.entries).expect("valid name");
        let yaml = convert::render(&profiles);
        let back = nodetune::manifest::parse_profiles(&yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        let merged = nodetune::plan::merge(back.iter());
        prop_assert!(merged.rejected.is_empty(), "{:?}", merged.rejected);
        prop_assert_eq!(merged.desired.len(), parsed.entries.len());
        for d in merged.desired.values() {
            prop_assert!(Policy::default().check(&d.key, &d.value).is_ok());
        }
    }

    /// The ledger reader never panics, and a valid ledger with one entry mangled keeps the rest.
    #[test]
    fn ledger_reader_keeps_good_entries(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                        junk in "[ -~]{0,12}", n in 1usize..6) {
        let _ = nodetune::sysctl::ledger::parse_entries(&bytes);
        let mut entries: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"key": "net.ipv4.k{i}", "original": "1", "scope": "NetworkNamespace", "firstChangedUnix": 1}}"#))
            .collect();
        entries.push(format!(r#"{{"key": {}, "original": "1"}}"#, serde_json::Value::String(junk)));
        let text = format!(r#"{{"version": 1, "entries": [{}]}}"#, entries.join(","));
        let (kept, dropped) = nodetune::sysctl::ledger::parse_entries(text.as_bytes()).expect("top level is fine");
        prop_assert_eq!(kept.len(), n);
        prop_assert_eq!(dropped.len(), 1);
    }

    /// The manifest reader never panics.
    #[test]
    fn manifest_reader_never_panics(text in "[ -~\n\t]{0,300}") {
        let _ = nodetune::manifest::parse_profiles(&text);
    }

    /// Value comparison ignores only whitespace layout.
    #[test]
    fn value_normalisation(a in "[0-9a-z \t]{0,20}") {
        let n = value::normalize(&a);
        prop_assert_eq!(value::normalize(&n), n.clone());
        prop_assert!(value::same(&a, &n));
    }
}
