//! The key grammar: never panics; the parser and the CRD's `KEY_PATTERN` agree; the canonical
//! form parses back to the same key.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use nodetune::sysctl::key::{self, KEY_MAX_LEN, KEY_PATTERN, SysctlKey};

static PATTERN: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(KEY_PATTERN).expect("KEY_PATTERN compiles"));

fuzz_target!(|raw: &str| {
    let parsed = key::parse_spec(raw);
    let unmarked_len = raw.strip_prefix('-').unwrap_or(raw).len();
    if unmarked_len <= KEY_MAX_LEN {
        assert_eq!(parsed.is_ok(), PATTERN.is_match(raw), "{raw:?}");
    }
    if let Ok((k, optional)) = parsed {
        let again = SysctlKey::parse(&k.dotted()).expect("canonical form parses");
        assert_eq!(again, k);
        assert_eq!(SysctlKey::parse(k.path()).expect("path form parses"), k);
        assert_eq!(key::parse_spec(&key::spec_string(&k, optional)).expect("spec"), (k, optional));
    }
});
