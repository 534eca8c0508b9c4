//! The manifest reader: never panics, and what it accepts plans without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(profiles) = nodetune::manifest::parse_profiles(text) {
        let _ = nodetune::plan::merge(profiles.iter());
    }
});
