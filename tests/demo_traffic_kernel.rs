//! `scripts/tw-traffic`, the demo's workload (issue 17 item 14): run in a fresh network namespace
//! (`unshare --net`), it leaves its TIME_WAIT sockets on the side that closes first, as `ss`
//! sees them. Root only; the host's namespace is never touched.
use std::collections::BTreeSet;
use std::process::Command;

mod kernel;

/// TIME_WAIT sockets after `tw-traffic --closer CLOSER --burst N`, as (local port, peer port)
/// pairs read by `ss` in the same fresh namespace.
fn time_wait_after(closer: &str, burst: u32) -> Vec<(u16, u16)> {
    let script = kernel::repo_path("scripts/tw-traffic");
    let shell = format!(
        "ip link set lo up && {} --closer {closer} --burst {burst} --rate 0 --seconds 0 >/dev/null \
         && ss -tanH state time-wait",
        script.display()
    );
    let out = kernel::run(Command::new("unshare").args(["--net", "sh", "-c", &shell]));
    out.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let port = |c: &str| c.rsplit(':').next()?.parse().ok();
            Some((port(cols.get(2)?)?, port(cols.get(3)?)?))
        })
        .collect()
}

#[test]
fn the_side_that_closes_first_keeps_the_time_wait_sockets() {
    if !kernel::root_or_skip("the_side_that_closes_first_keeps_the_time_wait_sockets") {
        return;
    }
    // The server closes: every TIME_WAIT socket is on the listener's one port.
    let server = time_wait_after("server", 300);
    assert!(server.len() >= 300, "{} TIME_WAIT sockets", server.len());
    let local: BTreeSet<u16> = server.iter().map(|(l, _)| *l).collect();
    assert_eq!(local.len(), 1, "server side: one local port, got {local:?}");
    // The client closes: they are on the client's ephemeral ports, to the listener's one port.
    let client = time_wait_after("client", 300);
    assert!(client.len() >= 300, "{} TIME_WAIT sockets", client.len());
    let peers: BTreeSet<u16> = client.iter().map(|(_, p)| *p).collect();
    assert_eq!(peers.len(), 1, "client side: one peer port, got {peers:?}");
}
