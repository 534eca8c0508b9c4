//! Human-readable rendering of a snapshot: the table the classic
//! `netstat -n | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'` prints, split by
//! family, in a fixed order, plus the limits that matter for TIME_WAIT.

use std::fmt::Write as _;

use super::TcpSnapshot;
use super::state::TcpState;

/// Renders the per-state table (IPv4, IPv6, TOTAL columns; every state, zeros included, so
/// two tables can be compared line by line), the TIME_WAIT headroom and the ephemeral ports.
pub fn render_table(snapshot: &TcpSnapshot) -> String {
    let rows: Vec<(&str, u64, u64, u64)> = TcpState::ALL
        .into_iter()
        .map(|state| {
            (
                state.as_str(),
                snapshot.ipv4.get(state),
                snapshot.ipv6.get(state),
                snapshot.total.get(state),
            )
        })
        .chain(std::iter::once((
            "ALL",
            snapshot.ipv4.total(),
            snapshot.ipv6.total(),
            snapshot.total.total(),
        )))
        .collect();
    let width = rows
        .iter()
        .map(|(_, a, b, c)| a.max(b).max(c).to_string().len())
        .max()
        .unwrap_or(0)
        .max("TOTAL".len());

    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11}  {:>width$}  {:>width$}  {:>width$}",
        "STATE", "IPV4", "IPV6", "TOTAL"
    );
    for (name, v4, v6, total) in rows {
        let _ = writeln!(
            out,
            "{name:<11}  {v4:>width$}  {v6:>width$}  {total:>width$}"
        );
    }
    let s = &snapshot.sockstat;
    let _ = writeln!(out, "source: {}", snapshot.source.as_str());
    if s.tcp_max_tw_buckets == 0 {
        let _ = writeln!(
            out,
            "TIME_WAIT headroom: none, tcp_max_tw_buckets is 0 ({} in use)",
            s.tcp_tw
        );
    } else {
        let percent = (u128::from(s.tcp_tw) * 100 + u128::from(s.tcp_max_tw_buckets) / 2)
            / u128::from(s.tcp_max_tw_buckets);
        let _ = writeln!(
            out,
            "TIME_WAIT headroom: {} of {} buckets in use ({percent}%)",
            s.tcp_tw, s.tcp_max_tw_buckets
        );
    }
    let range = s.ip_local_port_range;
    let _ = writeln!(
        out,
        "ephemeral ports: {}-{} ({} ports)",
        range.low,
        range.high,
        range.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcpstat::{PortRange, Sockstat, Source, StateCounts};

    fn snapshot(tw: u64, max: u64) -> TcpSnapshot {
        let mut ipv4 = StateCounts::default();
        ipv4.add_count(TcpState::TimeWait, 93000);
        ipv4.add_count(TcpState::Listen, 2);
        let mut ipv6 = StateCounts::default();
        ipv6.add_count(TcpState::TimeWait, 12);
        ipv6.add_count(TcpState::Established, 4);
        TcpSnapshot {
            source: Source::Netlink,
            ipv4,
            ipv6,
            total: ipv4 + ipv6,
            sockstat: Sockstat {
                tcp_inuse: 2,
                tcp_orphan: 0,
                tcp_tw: tw,
                tcp_alloc: 10,
                tcp_mem: 3,
                tcp6_inuse: Some(4),
                tcp_max_tw_buckets: max,
                ip_local_port_range: PortRange {
                    low: 32768,
                    high: 60999,
                },
            },
        }
    }

    #[test]
    fn renders_all_states_in_fixed_order_with_headroom() {
        let text = render_table(&snapshot(93012, 131072));
        let expected = "\
STATE         IPV4   IPV6  TOTAL
ESTABLISHED      0      4      4
SYN_SENT         0      0      0
SYN_RECV         0      0      0
FIN_WAIT1        0      0      0
FIN_WAIT2        0      0      0
TIME_WAIT    93000     12  93012
CLOSE            0      0      0
CLOSE_WAIT       0      0      0
LAST_ACK         0      0      0
LISTEN           2      0      2
CLOSING          0      0      0
ALL          93002     16  93018
source: netlink
TIME_WAIT headroom: 93012 of 131072 buckets in use (71%)
ephemeral ports: 32768-60999 (28232 ports)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn zero_bucket_limit_does_not_divide_by_zero() {
        let text = render_table(&snapshot(0, 0));
        assert!(
            text.contains("TIME_WAIT headroom: none, tcp_max_tw_buckets is 0"),
            "{text}"
        );
    }
}
