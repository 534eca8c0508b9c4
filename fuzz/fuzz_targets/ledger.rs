//! The ledger reader: never panics; every entry it keeps has a valid key and appears once.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok((entries, _dropped)) = nodetune::sysctl::ledger::parse_entries(bytes) {
        let mut keys: Vec<_> = entries.iter().map(|e| e.key.clone()).collect();
        keys.dedup();
        assert_eq!(keys.len(), entries.len());
    }
});
