//! The /proc/net/tcp parser: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = nodetune::tcpstat::procfs::parse_proc_net_tcp(text);
});
