//! Kernel test for TIME_WAIT at its cap (issue 17 item 13): real short connections in a fresh
//! network namespace whose `tcp_max_tw_buckets` is small, read the way the agent reads them
//! (sockstat and TcpExt `TCPTimeWaitOverflow`), judged and put into a report status.
//!
//! Needs root (to create a network namespace), like the other kernel tests; see
//! tests/kernel/mod.rs for how the body is re-run inside `unshare --net`.

mod kernel;

use kernel::{root_or_skip, run, run_helper_in_fresh_netns};

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nodetune::agent::report::{PassFacts, build_status};
use nodetune::agent::tcp::{TimeWaitWatch, read_overflows};
use nodetune::plan::Merged;
use nodetune::tcpstat::sockstat::read_sockstat;

const HELPER_ENV: &str = "NODETUNE_TIME_WAIT_NETNS_HELPER";
const HELPER_PASSED: &str = "time-wait netns helper passed";
/// The cap set in the namespace, and the connections closed client-first against it: the
/// issue's 5000 and 8000, scaled down so the test takes well under a second.
const CAP: u64 = 50;
const CONNECTIONS: u64 = 80;

#[test]
fn time_wait_at_the_cap_is_a_warning_in_fresh_netns() {
    if !root_or_skip("time_wait_at_the_cap_is_a_warning_in_fresh_netns") {
        return;
    }
    run_helper_in_fresh_netns(HELPER_ENV, HELPER_PASSED, "cap");
}

/// Not a test of its own: the body run inside the fresh namespace by the test above.
#[test]
#[ignore = "helper: runs only inside the network namespace the test above creates"]
fn netns_helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        eprintln!("netns_helper does nothing unless {HELPER_ENV} is set by a parent test");
        return;
    };
    kernel::assert_fresh_netns();
    run(Command::new("ip").args(["link", "set", "lo", "up"]));
    std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", CAP.to_string())
        .expect("set tcp_max_tw_buckets in the namespace");
    let proc_root = Path::new("/proc");
    let mut watch = TimeWaitWatch::new(Duration::from_secs(60));

    let before = read_sockstat(proc_root).expect("sockstat");
    let start = watch.assess(
        before.tcp_tw,
        before.tcp_max_tw_buckets,
        read_overflows(proc_root),
        Instant::now(),
    );
    assert!(start.pressure.is_empty(), "a fresh namespace: {start:?}");
    assert_eq!(
        start.overflows,
        Some(0),
        "the kernel has TCPTimeWaitOverflow"
    );

    short_connections(CONNECTIONS);
    let after = read_sockstat(proc_root).expect("sockstat");
    assert_eq!(after.tcp_max_tw_buckets, CAP);
    assert_eq!(after.tcp_tw, CAP, "TIME_WAIT sockets stop at the cap");
    let tw = watch.assess(
        after.tcp_tw,
        after.tcp_max_tw_buckets,
        read_overflows(proc_root),
        Instant::now(),
    );
    assert_eq!(
        tw.new_overflows,
        CONNECTIONS - CAP,
        "every connection past the cap was destroyed early: {tw:?}"
    );
    assert_eq!(tw.pressure.len(), 2, "at the cap and overflowing: {tw:?}");

    let merged = Merged::default();
    let status = build_status(&PassFacts {
        time_wait: Some(&tw),
        ..PassFacts::idle(&merged, Time(k8s_openapi::jiff::Timestamp::now()))
    });
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "TimeWaitPressure")
        .expect("TimeWaitPressure condition");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "TimeWaitPressure")
    );
    assert!(c.message.contains("TCPTimeWaitOverflow"), "{}", c.message);
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("tcp_max_tw_buckets (50)")),
        "{:?}",
        status.warnings
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True", "a warning, not a failure");
    println!("{HELPER_PASSED}: {mode}");
}

/// `n` loopback connections, each closed by the client first (the side left in TIME_WAIT),
/// waiting for the server to see the FIN so each close has happened before the next.
fn short_connections(n: u64) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("address");
    for _ in 0..n {
        let client = TcpStream::connect(addr).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        drop(client);
        server
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        assert_eq!(server.read(&mut byte).expect("EOF from the client"), 0);
        drop(server);
    }
}
