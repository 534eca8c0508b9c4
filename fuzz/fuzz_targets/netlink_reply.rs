//! The sock_diag reply parser: never panics on any datagram. The first four bytes pick the
//! sequence number the parser expects.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodetune::tcpstat::StateCounts;

fuzz_target!(|data: &[u8]| {
    let (seq, buf) = match data.split_first_chunk::<4>() {
        Some((seq, rest)) => (u32::from_ne_bytes(*seq), rest),
        None => (0, data),
    };
    let mut counts = StateCounts::default();
    let _ = nodetune::tcpstat::netlink::parse_datagram(buf, seq, &mut counts);
});
