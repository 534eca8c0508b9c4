//! The Python program that holds known TCP sockets for the tests: one loopback listener,
//! connected pairs kept open, connections closed client-first (the client side sits in
//! TIME_WAIT) and connections closed by the client only (the server side sits in CLOSE_WAIT).
//! It prints `ready` once all are made, then sleeps. Also `ss`'s state names in netstat's
//! spelling, to compare `ss` with what nodetune counts. Plain std, so the kernel tests include
//! it with `#[path = "support/socket_script.rs"]` without the cluster support.
#![allow(dead_code)]

/// How many sockets of each kind, and the script's pacing.
#[derive(Clone, Copy, Debug)]
pub struct SocketMix {
    pub established: usize,
    pub time_wait: usize,
    pub close_wait: usize,
    /// The listener's backlog.
    pub backlog: usize,
    /// Pause between the client's and the server's close, so the client closes first.
    pub close_gap_secs: f64,
    /// How long the holder sleeps after `ready` (it is killed before then).
    pub hold_secs: u32,
}

/// The script, for `python3 -c`.
pub fn python(mix: &SocketMix) -> String {
    let SocketMix {
        established,
        time_wait,
        close_wait,
        backlog,
        close_gap_secs,
        hold_secs,
    } = *mix;
    format!(
        r#"
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen({backlog})
port = srv.getsockname()[1]
held = []
for _ in range({established}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); held += [c, s]
for _ in range({time_wait}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); time.sleep({close_gap_secs}); s.close()
for _ in range({close_wait}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); held += [s]
print("ready", flush=True)
time.sleep({hold_secs})
"#
    )
}

/// The netstat (and report) name of a state as `ss -tan` prints it; `None` for one it does not
/// know.
pub fn netstat_name(ss_state: &str) -> Option<&'static str> {
    Some(match ss_state {
        "ESTAB" => "ESTABLISHED",
        "SYN-SENT" => "SYN_SENT",
        "SYN-RECV" => "SYN_RECV",
        "FIN-WAIT-1" => "FIN_WAIT1",
        "FIN-WAIT-2" => "FIN_WAIT2",
        "TIME-WAIT" => "TIME_WAIT",
        "UNCONN" | "CLOSE" => "CLOSE",
        "CLOSE-WAIT" => "CLOSE_WAIT",
        "LAST-ACK" => "LAST_ACK",
        "LISTEN" => "LISTEN",
        "CLOSING" => "CLOSING",
        _ => return None,
    })
}
