//! Counting TCP sockets per state from `/proc/net/tcp` and `/proc/net/tcp6`: the fallback when
//! netlink `sock_diag` is not available. Slower (the kernel formats ~150 bytes of text per
//! socket) but needs nothing beyond a readable procfs.

use std::io;
use std::path::Path;

use super::error::{ParseError, TcpStatError};
use super::state::{StateCounts, TcpState};

/// Counts the sockets listed in one `/proc/net/tcp` or `/proc/net/tcp6` text.
///
/// The first line is the column header; the state is the 4th column, in hex (`0A` = LISTEN).
/// `NEW_SYN_RECV` request sockets are already shown as `03` (SYN_RECV) there.
pub fn parse_proc_net_tcp(text: &str) -> Result<StateCounts, ParseError> {
    let mut counts = StateCounts::default();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let mut fields = line.split_ascii_whitespace();
        let Some(first) = fields.next() else {
            continue; // blank line
        };
        if index == 0 && first == "sl" {
            continue; // header
        }
        if !first.ends_with(':') {
            return Err(ParseError::new(
                number,
                format!("expected a slot number like `0:`, found {first:?}"),
            ));
        }
        let Some(state) = fields.nth(2) else {
            return Err(ParseError::new(number, "fewer than 4 columns"));
        };
        let value = u8::from_str_radix(state, 16)
            .map_err(|_| ParseError::new(number, format!("state {state:?} is not a hex byte")))?;
        let state = TcpState::from_kernel(value)
            .ok_or_else(|| ParseError::new(number, format!("unknown TCP state {value}")))?;
        counts.increment(state);
    }
    Ok(counts)
}

/// Reads and counts `<proc_root>/net/tcp` and `<proc_root>/net/tcp6`. `/proc/net` is the
/// reading process's network namespace. A missing `tcp6` (IPv6 disabled) counts as no sockets.
pub fn count(proc_root: &Path) -> Result<(StateCounts, StateCounts), TcpStatError> {
    let ipv4 = count_file(proc_root, "net/tcp", false)?;
    let ipv6 = count_file(proc_root, "net/tcp6", true)?;
    Ok((ipv4, ipv6))
}

fn count_file(
    proc_root: &Path,
    relative: &str,
    missing_is_empty: bool,
) -> Result<StateCounts, TcpStatError> {
    let path = proc_root.join(relative);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if missing_is_empty && err.kind() == io::ErrorKind::NotFound => {
            return Ok(StateCounts::default());
        }
        Err(source) => return Err(TcpStatError::Read { path, source }),
    };
    parse_proc_net_tcp(&text).map_err(|source| TcpStatError::Parse { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A3F7 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20725 1 0000000095989382 100 0 0 10 0
   1: 0100007F:A306 0100007F:E9A9 01 00000000:00000000 00:00000000 00000000     0        0 20727 1 00000000c573525d 20 0 0 10 -1
   2: 0100007F:865E 0100007F:A3F7 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   3: 0100007F:865F 0100007F:A3F7 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   4: 0100007F:A3F7 0100007F:8660 03 00000000:00000000 02:0000002A 00000002     0        0 0 1 0000000000000000
   5: 0100007F:A3F7 0100007F:8661 08 00000000:00000000 00:00000000 00000000     0        0 20999 1 0000000000000000 20 4 1 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:E9A9 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20725 1 0000000095989382 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:E9A9 0000000000000000FFFF00000100007F:A306 01 00000000:00000000 00:00000000 00000000     0        0 20727 1 00000000c573525d 20 0 0 10 -1
";

    #[test]
    fn counts_states_from_the_fourth_column() {
        let counts = parse_proc_net_tcp(TCP).expect("parse");
        assert_eq!(counts.get(TcpState::Listen), 1);
        assert_eq!(counts.get(TcpState::Established), 1);
        assert_eq!(counts.get(TcpState::TimeWait), 2);
        assert_eq!(counts.get(TcpState::SynRecv), 1);
        assert_eq!(counts.get(TcpState::CloseWait), 1);
        assert_eq!(counts.total(), 6);

        let v6 = parse_proc_net_tcp(TCP6).expect("parse v6");
        assert_eq!(v6.get(TcpState::Listen), 1);
        assert_eq!(
            v6.get(TcpState::Established),
            1,
            "v4-mapped socket counts as IPv6"
        );
    }

    #[test]
    fn header_only_and_empty_are_zero() {
        let header_only = TCP.lines().next().unwrap_or_default();
        assert_eq!(parse_proc_net_tcp(header_only), Ok(StateCounts::default()));
        assert_eq!(parse_proc_net_tcp(""), Ok(StateCounts::default()));
        assert_eq!(parse_proc_net_tcp("\n\n"), Ok(StateCounts::default()));
    }

    #[test]
    fn bad_lines_report_their_line_number() {
        let bad_state = format!("{TCP}   6: 0100007F:A3F7 00000000:0000 ZZ 0\n");
        let err = parse_proc_net_tcp(&bad_state).expect_err("bad hex");
        assert_eq!(err.line, 8);
        assert!(err.reason.contains("ZZ"), "{err}");

        let unknown = "   0: 0100007F:A3F7 00000000:0000 0D 0\n";
        let err = parse_proc_net_tcp(unknown).expect_err("state 13");
        assert!(err.reason.contains("unknown TCP state 13"), "{err}");

        let short = "   0: 0100007F:A3F7 00000000:0000\n";
        assert_eq!(parse_proc_net_tcp(short).map_err(|e| e.line), Err(1));

        let garbage = "hello world\n";
        assert!(parse_proc_net_tcp(garbage).is_err());
    }

    #[test]
    fn count_reads_files_under_a_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("net")).expect("mkdir");
        std::fs::write(dir.path().join("net/tcp"), TCP).expect("write");
        let (v4, v6) = count(dir.path()).expect("count without tcp6");
        assert_eq!(v4.total(), 6);
        assert_eq!(v6.total(), 0, "missing tcp6 means IPv6 is off");

        std::fs::write(dir.path().join("net/tcp6"), "  sl\n 0: x y QQ\n").expect("write");
        let err = count(dir.path()).expect_err("bad tcp6");
        assert!(err.to_string().contains("tcp6"), "{err}");

        std::fs::remove_file(dir.path().join("net/tcp")).expect("rm");
        assert!(matches!(count(dir.path()), Err(TcpStatError::Read { .. })));
    }
}
