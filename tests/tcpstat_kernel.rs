//! Kernel tests for the TCP state counter: real sockets in a fresh network namespace, counted
//! by the library (netlink and procfs) and by the `nodetune tcpstat` CLI, and checked against
//! both the numbers created and what `ss` reports in the same namespace.
//!
//! Needs root (to create a network namespace); CI runs as root. Elsewhere these tests fail
//! with a message, unless `NODETUNE_SKIP_ROOT_TESTS=1` turns them into a printed skip.
//!
//! How: each test re-executes this test binary under `unshare -n`, selecting the ignored
//! `netns_helper` test through an environment variable; the helper creates the sockets and
//! checks the counts from inside the namespace.

mod kernel;

use kernel::{root_or_skip, run, run_helper_in_fresh_netns};

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nodetune::tcpstat::netlink::{self, FamilyCounts, Walk};
use nodetune::tcpstat::{
    self, SnapshotOptions, Source, SourceChoice, StateCounts, TcpSnapshot, TcpState,
};

/// Selects the helper's mode (`library` or `cli`); set only in the re-executed child.
const HELPER_ENV: &str = "NODETUNE_TCPSTAT_NETNS_HELPER";
/// Printed by the helper at the end, so the parent knows it really ran (a name filter that
/// matched nothing would also exit 0).
const HELPER_PASSED: &str = "tcpstat netns helper passed";

/// Established connections per loopback address (each is two ESTABLISHED sockets).
const ESTABLISHED_PAIRS: u64 = 5;
/// Connections closed client-first per loopback address (each leaves one TIME_WAIT socket).
/// Enough that a dump spans several datagrams (about 370 records fit in one).
const TIME_WAIT_PAIRS: u64 = 300;
/// Bound for waiting until the sockets reach their states (normally a few milliseconds).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Tests run by `cargo test` (outside the namespace)

#[test]
fn library_counts_match_ss_and_created_sockets_in_fresh_netns() {
    if !root_or_skip("library_counts_match_ss_and_created_sockets_in_fresh_netns") {
        return;
    }
    run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "library");
}

/// CLI contract: `nodetune tcpstat --output json [--source procfs]` prints one `TcpSnapshot`.
#[test]
fn cli_tcpstat_json_matches_ss_in_fresh_netns() {
    if !root_or_skip("cli_tcpstat_json_matches_ss_in_fresh_netns") {
        return;
    }
    run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "cli");
}

/// Not a test of its own: the body run inside the fresh namespace by the tests above.
#[test]
#[ignore = "helper: runs only inside the network namespace the tests above create"]
fn netns_helper() {
    let Some(mode) = kernel::helper_mode(HELPER_ENV) else {
        return;
    };
    let before = ss_counts("-4") + ss_counts("-6");
    assert_eq!(
        before.total(),
        0,
        "helper must start in a fresh, empty network namespace"
    );
    run(Command::new("ip").args(["link", "set", "lo", "up"]));
    // No reuse of TIME_WAIT ports by later connects: the counts must stay what we created.
    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "0").expect("set tcp_tw_reuse in netns");

    let fixture = Fixture::create();
    let (want4, want6) = fixture.expected();
    let (ss4, ss6) = wait_for_ss(&want4, &want6);
    assert_eq!(ss4, want4, "ss -4 vs created");
    assert_eq!(ss6, want6, "ss -6 vs created");

    match mode.as_str() {
        "library" => check_library(&want4, &want6),
        "cli" => check_cli(&want4, &want6),
        other => panic!("unknown helper mode {other:?}"),
    }
    drop(fixture);
    println!("{HELPER_PASSED}: {mode}");
}

// ---------------------------------------------------------------------------------------------
// Checks inside the namespace

fn check_library(want4: &StateCounts, want6: &StateCounts) {
    // Every kernel with inet_diag answers the legacy one-walk request (it dates from 2.6), so
    // netlink and auto must take it; the per-family dumps only when forced.
    for (choice, source) in [
        (SourceChoice::Netlink, Source::NetlinkSingleWalk),
        (SourceChoice::Auto, Source::NetlinkSingleWalk),
        (SourceChoice::NetlinkPerFamily, Source::Netlink),
        (SourceChoice::Procfs, Source::Procfs),
    ] {
        let snapshot = tcpstat::snapshot_with(&SnapshotOptions {
            source: choice,
            ..SnapshotOptions::default()
        })
        .unwrap_or_else(|e| panic!("snapshot with {choice}: {e}"));
        check_snapshot(&snapshot, source, want4, want6);
    }
    let default = tcpstat::snapshot().expect("snapshot()");
    assert_eq!(default.source, Source::NetlinkSingleWalk);

    // The fallback, driven by a real kernel refusal (a legacy request cut short: EINVAL).
    let want = FamilyCounts {
        ipv4: *want4,
        ipv6: *want6,
    };
    let (counts, walk) = netlink::count().expect("netlink::count");
    assert_eq!((counts, walk), (want, Walk::Single), "one walk");
    let (counts, walk) =
        netlink::count_after_refused_single_walk().expect("count after a refused one-walk");
    assert_eq!(
        (counts, walk),
        (want, Walk::PerFamily),
        "fallback after refusal"
    );
    assert_eq!(
        netlink::count_per_family().expect("count_per_family"),
        want,
        "per family"
    );

    // sockstat: inuse counts hashed sockets (listening + connected) per family; tw both
    // families. All three are per namespace, so exact here.
    let s = default.sockstat;
    let hashed = |c: &StateCounts| c.get(TcpState::Listen) + c.get(TcpState::Established);
    assert_eq!(s.tcp_inuse, hashed(want4), "sockstat TCP inuse");
    assert_eq!(s.tcp6_inuse, Some(hashed(want6)), "sockstat6 TCP6 inuse");
    assert_eq!(s.tcp_tw, 2 * TIME_WAIT_PAIRS, "sockstat tw");
    assert!(s.tcp_max_tw_buckets > 0, "tcp_max_tw_buckets {s:?}");
    assert!(!s.ip_local_port_range.is_empty(), "port range {s:?}");

    let table = tcpstat::render_table(&default);
    let tw_row = format!(
        "TIME_WAIT    {:>5}  {:>5}  {:>5}",
        TIME_WAIT_PAIRS,
        TIME_WAIT_PAIRS,
        2 * TIME_WAIT_PAIRS
    );
    assert!(table.contains(&tw_row), "{table}");
    assert!(
        table.contains(&format!(
            "TIME_WAIT headroom: {} of {} buckets in use",
            2 * TIME_WAIT_PAIRS,
            s.tcp_max_tw_buckets
        )),
        "{table}"
    );
}

fn check_cli(want4: &StateCounts, want6: &StateCounts) {
    let binary = env!("CARGO_BIN_EXE_nodetune");
    for (args, source) in [
        (
            &["tcpstat", "--output", "json"][..],
            Source::NetlinkSingleWalk,
        ),
        (
            &[
                "tcpstat",
                "--output",
                "json",
                "--source",
                "netlink-per-family",
            ][..],
            Source::Netlink,
        ),
        (
            &["tcpstat", "--output", "json", "--source", "procfs"][..],
            Source::Procfs,
        ),
    ] {
        let stdout = run(Command::new(binary).args(args));
        let snapshot: TcpSnapshot = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "`nodetune {}` printed no snapshot ({e}):\n{stdout}",
                args.join(" ")
            )
        });
        let raw: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        for family in ["ipv4", "ipv6", "total"] {
            let keys = raw[family].as_object().map(|o| o.len());
            assert_eq!(
                keys,
                Some(TcpState::ALL.len()),
                "{family} lists every state"
            );
        }
        check_snapshot(&snapshot, source, want4, want6);
    }
}

fn check_snapshot(
    snapshot: &TcpSnapshot,
    source: Source,
    want4: &StateCounts,
    want6: &StateCounts,
) {
    assert_eq!(snapshot.source, source);
    assert_eq!(&snapshot.ipv4, want4, "{source} ipv4");
    assert_eq!(&snapshot.ipv6, want6, "{source} ipv6");
    assert_eq!(snapshot.total, *want4 + *want6, "{source} total");
    // And what ss sees right now, in case anything changed since settling.
    assert_eq!(snapshot.ipv4, ss_counts("-4"), "{source} ipv4 vs ss");
    assert_eq!(snapshot.ipv6, ss_counts("-6"), "{source} ipv6 vs ss");
}

// ---------------------------------------------------------------------------------------------
// Socket fixture

/// Sockets held open for the duration of a check. TIME_WAIT sockets need no handle: they
/// stay for 60 s after their close.
struct Fixture {
    _listeners: Vec<TcpListener>,
    _streams: Vec<TcpStream>,
}

impl Fixture {
    fn create() -> Self {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1");
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind ::1");
        // Dual-stack listener: an IPv4 client connecting to it yields an IPv4-mapped IPv6
        // socket on the server side, which must count as IPv6.
        let dual = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("bind [::]");
        let mut streams = Vec::new();
        for listener in [&v4, &v6] {
            let addr = listener.local_addr().expect("listener address");
            for _ in 0..ESTABLISHED_PAIRS {
                let (client, server) = connect_pair(listener, addr);
                streams.extend([client, server]);
            }
            for _ in 0..TIME_WAIT_PAIRS {
                let (client, mut server) = connect_pair(listener, addr);
                drop(client); // client closes first: it is the side left in TIME_WAIT
                server
                    .set_read_timeout(Some(SETTLE_TIMEOUT))
                    .expect("read timeout");
                let mut byte = [0u8; 1];
                let n = server
                    .read(&mut byte)
                    .expect("server waits for the client's FIN");
                assert_eq!(n, 0, "expected EOF from the closing client");
                drop(server);
            }
        }
        let dual_port = dual.local_addr().expect("dual address").port();
        let (client, server) =
            connect_pair(&dual, SocketAddr::from((Ipv4Addr::LOCALHOST, dual_port)));
        assert!(
            server.local_addr().is_ok_and(|a| a.is_ipv6()),
            "accepted socket is IPv4-mapped IPv6"
        );
        streams.extend([client, server]);
        Fixture {
            _listeners: vec![v4, v6, dual],
            _streams: streams,
        }
    }

    /// (IPv4, IPv6) counts the fixture creates once every close has finished.
    fn expected(&self) -> (StateCounts, StateCounts) {
        let mut v4 = StateCounts::default();
        v4.set(TcpState::Listen, 1);
        v4.set(TcpState::Established, 2 * ESTABLISHED_PAIRS + 1); // + mapped client
        v4.set(TcpState::TimeWait, TIME_WAIT_PAIRS);
        let mut v6 = StateCounts::default();
        v6.set(TcpState::Listen, 2); // ::1 and [::]
        v6.set(TcpState::Established, 2 * ESTABLISHED_PAIRS + 1); // + mapped server side
        v6.set(TcpState::TimeWait, TIME_WAIT_PAIRS);
        (v4, v6)
    }
}

fn connect_pair(listener: &TcpListener, addr: SocketAddr) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

// ---------------------------------------------------------------------------------------------
// ss

/// Counts `ss -tanH <family>` by state, mapped to netstat names.
fn ss_counts(family: &str) -> StateCounts {
    let out = run(Command::new("ss").args(["-tanH", family]));
    out.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(|name| {
            ss_state(name).unwrap_or_else(|| panic!("unknown ss state {name:?} in:\n{out}"))
        })
        .collect()
}

fn ss_state(name: &str) -> Option<TcpState> {
    Some(match name {
        "ESTAB" => TcpState::Established,
        "SYN-SENT" => TcpState::SynSent,
        "SYN-RECV" => TcpState::SynRecv,
        "FIN-WAIT-1" => TcpState::FinWait1,
        "FIN-WAIT-2" => TcpState::FinWait2,
        "TIME-WAIT" => TcpState::TimeWait,
        "UNCONN" | "CLOSE" => TcpState::Close,
        "CLOSE-WAIT" => TcpState::CloseWait,
        "LAST-ACK" => TcpState::LastAck,
        "LISTEN" => TcpState::Listen,
        "CLOSING" => TcpState::Closing,
        _ => return None,
    })
}

/// Polls `ss` until it shows the expected counts (closing handshakes finish asynchronously),
/// bounded by [`SETTLE_TIMEOUT`]; returns the last counts seen.
fn wait_for_ss(want4: &StateCounts, want6: &StateCounts) -> (StateCounts, StateCounts) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let got = (ss_counts("-4"), ss_counts("-6"));
        if (&got.0, &got.1) == (want4, want6) || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Process plumbing
