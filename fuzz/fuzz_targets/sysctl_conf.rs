//! The sysctl.conf converter: never panics, and every profile it writes is read back by the
//! manifest reader with no key rejected (what `plan` and admission would refuse).
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodetune::convert;
use nodetune::sysctl::Policy;

fuzz_target!(|text: &str| {
    let Ok(parsed) = convert::parse_sysctl_conf(text, &Policy::default()) else {
        return;
    };
    if parsed.entries.is_empty() {
        return;
    }
    let profiles = convert::to_profiles("fuzz", None, &parsed.entries).expect("valid name");
    let yaml = convert::render(&profiles);
    let back = nodetune::manifest::parse_profiles(&yaml)
        .unwrap_or_else(|e| panic!("convert wrote a manifest the reader refuses: {e}\n{yaml}"));
    let merged = nodetune::plan::merge(back.iter());
    assert!(merged.rejected.is_empty(), "{:?}", merged.rejected);
    assert_eq!(merged.desired.len(), parsed.entries.len());
    for d in merged.desired.values() {
        Policy::default()
            .check(&d.key, &d.value)
            .expect("every converted value passes the checks");
    }
});
