//! The sock_diag reply parser: never panics on any datagram. The first four bytes pick the
//! sequence number the parser expects, the fifth which request's replies it expects (the
//! single-walk `TCPDIAG_GETSOCK` or a per-family `SOCK_DIAG_BY_FAMILY` dump).
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodetune::tcpstat::netlink::{Family, FamilyCounts, Request, parse_datagram};

fuzz_target!(|data: &[u8]| {
    let (seq, rest) = match data.split_first_chunk::<4>() {
        Some((seq, rest)) => (u32::from_ne_bytes(*seq), rest),
        None => (0, data),
    };
    let (request, buf) = match rest.split_first() {
        Some((0, buf)) => (Request::AllFamilies, buf),
        Some((1, buf)) => (Request::Family(Family::Inet), buf),
        Some((_, buf)) => (Request::Family(Family::Inet6), buf),
        None => (Request::AllFamilies, rest),
    };
    let mut counts = FamilyCounts::default();
    let _ = parse_datagram(buf, seq, request.record_type(), &mut counts);
});
