//! `/proc/net/sockstat{,6}` and the two sysctls that bound TIME_WAIT and outgoing connections.
//!
//! In a network namespace, `inuse` and `tw` are that namespace's; `orphan`, `alloc` and `mem`
//! are machine-wide kernel counters.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{ParseError, TcpStatError};

/// The `TCP:` line of `/proc/net/sockstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem: u64,
}

/// The ephemeral port range (`net.ipv4.ip_local_port_range`) used for outgoing connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    /// Number of ports in the range (0 if the kernel ever reported low > high).
    pub fn len(&self) -> u32 {
        if self.high < self.low {
            0
        } else {
            u32::from(self.high) - u32::from(self.low) + 1
        }
    }

    /// Whether the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Kernel socket accounting for TCP in the current network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sockstat {
    /// IPv4 TCP sockets in use (hashed: listening and connected, not TIME_WAIT).
    pub tcp_inuse: u64,
    /// Orphaned sockets (closed by their process, still finishing the close; machine-wide).
    pub tcp_orphan: u64,
    /// TIME_WAIT sockets of both families, the number `tcpMaxTwBuckets` caps.
    pub tcp_tw: u64,
    /// Allocated TCP sockets (machine-wide).
    pub tcp_alloc: u64,
    /// Memory used by TCP buffers, in pages (machine-wide; compared with `net.ipv4.tcp_mem`).
    pub tcp_mem: u64,
    /// IPv6 TCP sockets in use; `None` when IPv6 is disabled.
    pub tcp6_inuse: Option<u64>,
    /// `net.ipv4.tcp_max_tw_buckets`: beyond it new TIME_WAIT sockets are destroyed at once.
    pub tcp_max_tw_buckets: u64,
    /// `net.ipv4.ip_local_port_range`.
    pub ip_local_port_range: PortRange,
}

/// Parses the `TCP:` line of `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Result<TcpSockstat, ParseError> {
    let (line, fields) = find_line(text, "TCP:")?;
    let pairs = pairs(line, fields)?;
    // Unknown keys are ignored: newer kernels may add fields.
    let field = |name: &str| {
        pairs
            .iter()
            .find_map(|(key, value)| (*key == name).then_some(*value))
            .ok_or_else(|| ParseError::new(line, format!("TCP line lacks `{name}`")))
    };
    Ok(TcpSockstat {
        inuse: field("inuse")?,
        orphan: field("orphan")?,
        tw: field("tw")?,
        alloc: field("alloc")?,
        mem: field("mem")?,
    })
}

/// Parses `inuse` from the `TCP6:` line of `/proc/net/sockstat6`.
pub fn parse_sockstat6(text: &str) -> Result<u64, ParseError> {
    let (line, fields) = find_line(text, "TCP6:")?;
    pairs(line, fields)?
        .into_iter()
        .find_map(|(key, value)| (key == "inuse").then_some(value))
        .ok_or_else(|| ParseError::new(line, "TCP6 line lacks `inuse`"))
}

/// Parses a sysctl holding one unsigned number, e.g. `tcp_max_tw_buckets`.
pub fn parse_u64_sysctl(text: &str) -> Result<u64, ParseError> {
    let value = text.trim();
    value
        .parse()
        .map_err(|_| ParseError::new(1, format!("{value:?} is not an unsigned number")))
}

/// Parses `ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Result<PortRange, ParseError> {
    let mut parts = text.split_ascii_whitespace();
    let (Some(low), Some(high), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ParseError::new(
            1,
            format!("{:?} is not two port numbers", text.trim()),
        ));
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| ParseError::new(1, format!("{p:?} is not a port number")))
    };
    Ok(PortRange {
        low: port(low)?,
        high: port(high)?,
    })
}

fn find_line<'a>(
    text: &'a str,
    tag: &str,
) -> Result<(usize, std::str::SplitAsciiWhitespace<'a>), ParseError> {
    text.lines()
        .enumerate()
        .find_map(|(i, line)| {
            let mut fields = line.split_ascii_whitespace();
            (fields.next() == Some(tag)).then_some((i + 1, fields))
        })
        .ok_or_else(|| ParseError::new(0, format!("no `{tag}` line")))
}

/// `key value key value ...` after the tag.
fn pairs<'a>(
    line: usize,
    mut fields: impl Iterator<Item = &'a str>,
) -> Result<Vec<(&'a str, u64)>, ParseError> {
    let mut out = Vec::new();
    while let Some(key) = fields.next() {
        let value = fields
            .next()
            .ok_or_else(|| ParseError::new(line, format!("`{key}` has no value")))?;
        let value = value.parse().map_err(|_| {
            ParseError::new(line, format!("`{key}` value {value:?} is not a number"))
        })?;
        out.push((key, value));
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String, TcpStatError> {
    std::fs::read_to_string(path).map_err(|source| TcpStatError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parsed<T>(
    path: &Path,
    text: &str,
    parse: fn(&str) -> Result<T, ParseError>,
) -> Result<T, TcpStatError> {
    parse(text).map_err(|source| TcpStatError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads sockstat and the two sysctls under `proc_root` (normally `/proc`).
pub fn read_sockstat(proc_root: &Path) -> Result<Sockstat, TcpStatError> {
    let path = proc_root.join("net/sockstat");
    let tcp = parsed(&path, &read(&path)?, parse_sockstat)?;

    let path = proc_root.join("net/sockstat6");
    let tcp6_inuse = match std::fs::read_to_string(&path) {
        Ok(text) => Some(parsed(&path, &text, parse_sockstat6)?),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(TcpStatError::Read { path, source }),
    };

    let path = proc_root.join("sys/net/ipv4/tcp_max_tw_buckets");
    let tcp_max_tw_buckets = parsed(&path, &read(&path)?, parse_u64_sysctl)?;
    let path = proc_root.join("sys/net/ipv4/ip_local_port_range");
    let ip_local_port_range = parsed(&path, &read(&path)?, parse_port_range)?;

    Ok(Sockstat {
        tcp_inuse: tcp.inuse,
        tcp_orphan: tcp.orphan,
        tcp_tw: tcp.tw,
        tcp_alloc: tcp.alloc,
        tcp_mem: tcp.mem,
        tcp6_inuse,
        tcp_max_tw_buckets,
        ip_local_port_range,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKSTAT: &str = "sockets: used 6
TCP: inuse 2 orphan 1 tw 93012 alloc 6 mem 175
UDP: inuse 0 mem 0
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
";
    const SOCKSTAT6: &str = "TCP6: inuse 3
UDP6: inuse 0
UDPLITE6: inuse 0
RAW6: inuse 0
FRAG6: inuse 0 memory 0
";

    #[test]
    fn parses_tcp_line() {
        assert_eq!(
            parse_sockstat(SOCKSTAT),
            Ok(TcpSockstat {
                inuse: 2,
                orphan: 1,
                tw: 93012,
                alloc: 6,
                mem: 175
            })
        );
        assert_eq!(parse_sockstat6(SOCKSTAT6), Ok(3));
    }

    #[test]
    fn tolerates_new_fields_rejects_missing_and_garbage() {
        let extra = "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 0 future 9\n";
        assert_eq!(parse_sockstat(extra).map(|t| t.inuse), Ok(1));
        let missing = "TCP: inuse 1 orphan 0 alloc 1 mem 0\n";
        let err = parse_sockstat(missing).expect_err("no tw");
        assert!(err.reason.contains("`tw`"), "{err}");
        assert!(parse_sockstat("TCP: inuse x orphan 0 tw 0 alloc 1 mem 0").is_err());
        assert!(parse_sockstat("TCP: inuse").is_err());
        assert_eq!(parse_sockstat("UDP: inuse 0").map_err(|e| e.line), Err(0));
        assert!(parse_sockstat6("TCP6:").is_err());
        assert!(parse_sockstat6(SOCKSTAT).is_err());
    }

    #[test]
    fn parses_sysctls() {
        assert_eq!(parse_u64_sysctl("131072\n"), Ok(131072));
        assert!(parse_u64_sysctl("-1").is_err());
        assert_eq!(
            parse_port_range("32768\t60999\n"),
            Ok(PortRange {
                low: 32768,
                high: 60999
            })
        );
        assert_eq!(parse_port_range("32768 60999").map(|r| r.len()), Ok(28232));
        assert!(parse_port_range("32768").is_err());
        assert!(parse_port_range("1 2 3").is_err());
        assert!(parse_port_range("1 70000").is_err());
        assert!(PortRange { low: 5, high: 4 }.is_empty());
    }

    #[test]
    fn serialises_camel_case() {
        let s = Sockstat {
            tcp_inuse: 1,
            tcp_orphan: 0,
            tcp_tw: 2,
            tcp_alloc: 3,
            tcp_mem: 4,
            tcp6_inuse: Some(5),
            tcp_max_tw_buckets: 131072,
            ip_local_port_range: PortRange {
                low: 32768,
                high: 60999,
            },
        };
        assert_eq!(
            serde_json::to_value(s).ok(),
            Some(serde_json::json!({
                "tcpInuse": 1, "tcpOrphan": 0, "tcpTw": 2, "tcpAlloc": 3, "tcpMem": 4,
                "tcp6Inuse": 5, "tcpMaxTwBuckets": 131072,
                "ipLocalPortRange": {"low": 32768, "high": 60999}
            }))
        );
    }

    #[test]
    fn read_sockstat_from_a_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("net")).expect("mkdir");
        std::fs::create_dir_all(root.join("sys/net/ipv4")).expect("mkdir");
        std::fs::write(root.join("net/sockstat"), SOCKSTAT).expect("write");
        std::fs::write(root.join("sys/net/ipv4/tcp_max_tw_buckets"), "131072\n").expect("write");
        std::fs::write(
            root.join("sys/net/ipv4/ip_local_port_range"),
            "1024\t65000\n",
        )
        .expect("write");
        let s = read_sockstat(root).expect("read without sockstat6");
        assert_eq!(s.tcp_tw, 93012);
        assert_eq!(s.tcp6_inuse, None);
        assert_eq!(s.ip_local_port_range.len(), 63977);
        std::fs::write(root.join("net/sockstat6"), SOCKSTAT6).expect("write");
        assert_eq!(read_sockstat(root).ok().and_then(|s| s.tcp6_inuse), Some(3));
    }
}
