//! The kernel's cumulative TCP "damage" counters of the current network namespace: the named
//! `TcpExt` fields of `/proc/net/netstat` and `Tcp` fields of `/proc/net/snmp` an SRE looks at
//! after a TCP change (accept-queue overflows, aborts for lack of memory, retransmissions...).
//!
//! Both files are read with a size bound and parsed as untrusted text: a header line of names,
//! then a line of values with the same prefix. Only the counters of [`COUNTERS`] are kept, so a
//! report and the metrics hold a bounded set whatever the kernel adds; a counter this kernel does
//! not have is simply absent.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ParseError;
use crate::bounded_read::{BoundedReadError, read_regular_file};

/// Which table of which file a counter is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// `TcpExt:` lines of `/proc/net/netstat`.
    TcpExt,
    /// `Tcp:` lines of `/proc/net/snmp`.
    Tcp,
}

impl Table {
    /// The line prefix, colon included.
    pub const fn prefix(self) -> &'static str {
        match self {
            Table::TcpExt => "TcpExt:",
            Table::Tcp => "Tcp:",
        }
    }

    /// The file under the proc root.
    pub const fn file(self) -> &'static str {
        match self {
            Table::TcpExt => "net/netstat",
            Table::Tcp => "net/snmp",
        }
    }
}

/// The counters kept, in the order reports list them. Chosen for what goes wrong after a TCP
/// sysctl change: queues too short (`ListenOverflows`, `ListenDrops`, `TCPReqQFullDrop`,
/// `TCPBacklogDrop`), memory limits too low (`TCPAbortOnMemory`, `TCPMemoryPressures`,
/// `TCPOFODrop`), TIME_WAIT cap (`TCPTimeWaitOverflow`), timeouts and retransmissions
/// (`TCPAbortOnTimeout`, `TCPSynRetrans`, `RetransSegs` against `OutSegs`), resets and failed
/// connects (`AttemptFails`, `EstabResets`, `OutRsts`, `InErrs`).
pub const COUNTERS: [(Table, &str); 16] = [
    (Table::TcpExt, "ListenOverflows"),
    (Table::TcpExt, "ListenDrops"),
    (Table::TcpExt, "TCPTimeWaitOverflow"),
    (Table::TcpExt, "TCPAbortOnMemory"),
    (Table::TcpExt, "TCPAbortOnTimeout"),
    (Table::TcpExt, "TCPMemoryPressures"),
    (Table::TcpExt, "TCPBacklogDrop"),
    (Table::TcpExt, "TCPReqQFullDrop"),
    (Table::TcpExt, "TCPOFODrop"),
    (Table::TcpExt, "TCPSynRetrans"),
    (Table::Tcp, "RetransSegs"),
    (Table::Tcp, "OutSegs"),
    (Table::Tcp, "AttemptFails"),
    (Table::Tcp, "EstabResets"),
    (Table::Tcp, "OutRsts"),
    (Table::Tcp, "InErrs"),
];

/// The counter's name as [`COUNTERS`] spells it, if it is one: how admission and the guards
/// check a name given by a user.
pub fn known(name: &str) -> Option<&'static str> {
    COUNTERS.iter().map(|(_, n)| *n).find(|n| *n == name)
}

/// Most bytes read of either file: the kernel's netstat is about 4 KiB; anything past this is
/// not a kernel file.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Why the counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: BoundedReadError,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

/// Values of the known counters this kernel has, by name.
pub type Counters = BTreeMap<&'static str, u64>;

/// The `(name, value)` pairs of `table` in `text`: the first line with its prefix names the
/// fields, the second holds the values. A table that is absent gives nothing (an old kernel, a
/// file of the other table); one that is malformed is an error, never a guess.
pub fn parse_table(text: &str, table: Table) -> Result<Vec<(&str, &str)>, ParseError> {
    let prefix = table.prefix();
    let mut lines = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| l.strip_prefix(prefix).map(|rest| (i + 1, rest)));
    let Some((names_at, names)) = lines.next() else {
        return Ok(Vec::new());
    };
    let Some((values_at, values)) = lines.next() else {
        return Err(ParseError::new(
            names_at,
            format!("{prefix} names without a line of values"),
        ));
    };
    if let Some((extra, _)) = lines.next() {
        return Err(ParseError::new(
            extra,
            format!("a third {prefix} line: the kernel writes one pair"),
        ));
    }
    let names: Vec<&str> = names.split_whitespace().collect();
    let values: Vec<&str> = values.split_whitespace().collect();
    if names.len() != values.len() {
        return Err(ParseError::new(
            values_at,
            format!("{} {prefix} values for {} names", values.len(), names.len()),
        ));
    }
    Ok(names.into_iter().zip(values).collect())
}

/// The known counters of `table` in `text`, added to `into`. A known counter named twice, or
/// whose value is no unsigned integer, is an error naming it.
fn collect(text: &str, table: Table, into: &mut Counters) -> Result<(), ParseError> {
    for (name, value) in parse_table(text, table)? {
        let Some(known) = COUNTERS
            .iter()
            .find(|(t, n)| *t == table && *n == name)
            .map(|(_, n)| *n)
        else {
            continue;
        };
        let parsed: u64 = value
            .parse()
            .map_err(|_| ParseError::new(0, format!("{name}: {value:?} is not a counter value")))?;
        if into.insert(known, parsed).is_some() {
            return Err(ParseError::new(0, format!("{name} is named twice")));
        }
    }
    Ok(())
}

/// The known counters from the texts of `/proc/net/netstat` and `/proc/net/snmp`.
pub fn parse(netstat: &str, snmp: &str) -> Result<Counters, (Table, ParseError)> {
    let mut counters = Counters::new();
    collect(netstat, Table::TcpExt, &mut counters).map_err(|e| (Table::TcpExt, e))?;
    collect(snmp, Table::Tcp, &mut counters).map_err(|e| (Table::Tcp, e))?;
    Ok(counters)
}

/// The known counters of the namespace whose procfs is at `proc_root` (normally `/proc`).
pub fn read(proc_root: &Path) -> Result<Counters, CountersError> {
    let text = |table: Table| {
        let path = proc_root.join(table.file());
        read_regular_file(&path, MAX_FILE_BYTES).map_err(|source| CountersError::Read {
            path: path.clone(),
            source,
        })
    };
    let netstat = text(Table::TcpExt)?;
    let snmp = text(Table::Tcp)?;
    parse(&netstat, &snmp).map_err(|(table, source)| CountersError::Parse {
        path: proc_root.join(table.file()),
        source,
    })
}

/// One counter with its rate over the last completed window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterRate {
    pub name: &'static str,
    /// The cumulative value now.
    pub total: u64,
    /// Rises per minute over the last completed window (rounded down); `None` before a window
    /// completed, or when the counter went down in it (a new namespace, not a rate).
    pub per_minute: Option<u64>,
}

/// Per-minute rates over windows of at least `window`: a window closes on the first reading
/// past it, so rates describe a span the reader can state, whatever the pass interval. Rates
/// stay those of the last closed window until the next one closes; totals are always fresh.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    start: Option<(Instant, Counters)>,
    rates: BTreeMap<&'static str, Option<u64>>,
    last_span: Option<Duration>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            start: None,
            rates: BTreeMap::new(),
            last_span: None,
        }
    }

    /// How long the window of the current rates lasted; `None` before one closed.
    pub fn span(&self) -> Option<Duration> {
        self.last_span
    }

    /// Takes a reading at `now` and returns every counter of it with its rate.
    pub fn observe(&mut self, now: Instant, counters: &Counters) -> Vec<CounterRate> {
        match &self.start {
            None => self.start = Some((now, counters.clone())),
            Some((at, before)) => {
                let span = now.saturating_duration_since(*at);
                if span >= self.window && !span.is_zero() {
                    self.rates = counters
                        .iter()
                        .map(|(name, now_v)| {
                            let rate = before
                                .get(name)
                                .and_then(|b| now_v.checked_sub(*b))
                                .map(|rise| per_minute(rise, span));
                            (*name, rate)
                        })
                        .collect();
                    self.last_span = Some(span);
                    self.start = Some((now, counters.clone()));
                }
            }
        }
        counters
            .iter()
            .map(|(name, total)| CounterRate {
                name,
                total: *total,
                per_minute: self.rates.get(name).copied().flatten(),
            })
            .collect()
    }
}

/// `rise` over `span` as a whole number per minute (rounded down; saturating).
pub fn per_minute(rise: u64, span: Duration) -> u64 {
    let millis = span.as_millis().max(1);
    let per = u128::from(rise).saturating_mul(60_000) / millis;
    u64::try_from(per).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPTimeWaitOverflow TCPAbortOnMemory Unknown\n\
                           TcpExt: 1 12 13 4 5 99\n\
                           IpExt: InNoRoutes ListenOverflows\n\
                           IpExt: 0 777\n";
    const SNMP: &str = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                        Tcp: RtoAlgorithm MaxConn RetransSegs OutSegs\n\
                        Tcp: 1 -1 40 1000\n";

    #[test]
    fn keeps_the_known_counters_of_each_table_by_name() {
        let c = parse(NETSTAT, SNMP).expect("parse");
        assert_eq!(c["ListenOverflows"], 12, "TcpExt's, not IpExt's");
        assert_eq!(c["ListenDrops"], 13);
        assert_eq!(c["TCPTimeWaitOverflow"], 4);
        assert_eq!(c["TCPAbortOnMemory"], 5);
        assert_eq!(c["RetransSegs"], 40);
        assert_eq!(c["OutSegs"], 1000);
        assert_eq!(
            c.len(),
            6,
            "unknown fields and MaxConn's -1 are left out: {c:?}"
        );
        assert!(
            !c.contains_key("TCPOFODrop"),
            "absent on this kernel, so absent"
        );
    }

    #[test]
    fn the_real_files_of_this_namespace_parse() {
        let c = read(Path::new("/proc")).expect("read /proc");
        for name in ["ListenOverflows", "ListenDrops", "RetransSegs", "OutSegs"] {
            assert!(c.contains_key(name), "{name} missing: {c:?}");
        }
        assert!(c.len() <= COUNTERS.len());
    }

    #[test]
    fn hostile_tables_are_errors_that_name_the_problem() {
        let cases = [
            ("TcpExt: ListenOverflows\n", "without a line of values"),
            (
                "TcpExt: ListenOverflows ListenDrops\nTcpExt: 1\n",
                "1 TcpExt: values for 2 names",
            ),
            ("TcpExt: ListenOverflows\nTcpExt: 1\nTcpExt: 2\n", "third"),
            (
                "TcpExt: ListenOverflows\nTcpExt: -3\n",
                "ListenOverflows: \"-3\"",
            ),
            (
                "TcpExt: ListenOverflows\nTcpExt: 99999999999999999999999\n",
                "not a counter value",
            ),
            (
                "TcpExt: ListenOverflows ListenOverflows\nTcpExt: 1 2\n",
                "named twice",
            ),
            ("TcpExt: ListenDrops\nTcpExt: 0x10\n", "not a counter value"),
        ];
        for (text, want) in cases {
            let (table, e) = parse(text, "").expect_err(text);
            assert_eq!(table, Table::TcpExt);
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        // A table the file lacks is no error: nothing is known from it.
        assert!(parse("garbage\n\0\u{feff}", "").expect("parse").is_empty());
        assert!(parse("", "").expect("parse").is_empty());
    }

    #[test]
    fn a_huge_or_special_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("net")).expect("mkdir");
        let big = "TcpExt: X\n".repeat((MAX_FILE_BYTES / 10 + 1) as usize);
        std::fs::write(dir.path().join("net/netstat"), big).expect("write");
        std::fs::write(dir.path().join("net/snmp"), "").expect("write");
        let e = read(dir.path()).expect_err("too big");
        assert!(matches!(e, CountersError::Read { .. }), "{e}");
        std::fs::remove_file(dir.path().join("net/netstat")).expect("rm");
        std::fs::create_dir(dir.path().join("net/netstat")).expect("mkdir");
        let e = read(dir.path()).expect_err("a directory");
        assert!(e.to_string().contains("net/netstat"), "{e}");
    }

    #[test]
    fn rates_are_per_minute_over_closed_windows() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let reading =
            |lo: u64, rs: u64| Counters::from([("ListenOverflows", lo), ("RetransSegs", rs)]);
        let mut w = RateWindow::new(Duration::from_secs(30));
        let first = w.observe(at(0), &reading(100, 5));
        assert!(first.iter().all(|c| c.per_minute.is_none()), "{first:?}");
        // Inside the window: fresh totals, no rate yet.
        let mid = w.observe(at(10), &reading(110, 5));
        assert_eq!(mid[0].total, 110);
        assert_eq!(mid[0].per_minute, None);
        // The window closes at 30 s: 60 rises in 30 s is 120 a minute.
        let closed = w.observe(at(30), &reading(160, 5));
        assert_eq!(closed[0].per_minute, Some(120));
        assert_eq!(closed[1].per_minute, Some(0));
        assert_eq!(w.span(), Some(Duration::from_secs(30)));
        // The rate holds until the next window closes.
        assert_eq!(w.observe(at(40), &reading(161, 5))[0].per_minute, Some(120));
        // A counter that went down (a new namespace) has no rate for that window.
        let reset = w.observe(at(70), &reading(3, 5));
        assert_eq!(reset[0].per_minute, None);
        assert_eq!(reset[0].total, 3);
    }

    #[test]
    fn per_minute_rounds_down_and_saturates() {
        assert_eq!(per_minute(1, Duration::from_secs(61)), 0);
        assert_eq!(per_minute(7, Duration::from_secs(60)), 7);
        assert_eq!(per_minute(1, Duration::from_millis(500)), 120);
        assert_eq!(per_minute(u64::MAX, Duration::from_millis(1)), u64::MAX);
        assert_eq!(per_minute(5, Duration::ZERO), 300_000);
    }

    #[test]
    fn known_names_are_checked_exactly() {
        assert_eq!(known("ListenOverflows"), Some("ListenOverflows"));
        assert_eq!(known("listenoverflows"), None);
        assert_eq!(known("MaxConn"), None);
        // The report's schema bound is this list's length.
        assert_eq!(COUNTERS.len(), crate::api::report::MAX_TCP_COUNTERS);
    }
}
