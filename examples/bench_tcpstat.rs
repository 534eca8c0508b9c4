//! Benchmark: counting many TIME_WAIT sockets per state by four methods, in a fresh network
//! namespace:
//!
//! 1. `tcpstat` with netlink sock_diag (what the agent does),
//!    (and one bare AF_INET dump, to show what the second, IPv6, walk and sockstat cost),
//! 2. `tcpstat` with procfs (`/proc/net/tcp{,6}`, the fallback),
//! 3. `ss -tanH | awk`,
//! 4. the classic `netstat -n | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'`.
//!
//! Run as root: `cargo run --release --example bench_tcpstat [-- SOCKETS [ROUNDS]]`
//! (defaults: 50000 sockets, 7 rounds). It re-executes itself under `unshare --net`, creates the
//! TIME_WAIT sockets in batches (they need no file descriptor after close, so the ~20k open-file
//! limit does not bind), then times every method once per round, interleaved so that noise
//! hits all alike, and prints medians and ratios to netlink. Compare ratios, not absolute
//! times: the machines are shared and noisy. TIME_WAIT lasts 60 s, so creating and measuring
//! must fit in that window; the program checks the count before and after measuring.
//!
//! Note: all namespaces share the machine's TCP hash table, so sockets elsewhere on the machine
//! add to every method's cost.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nodetune::tcpstat::{self, SnapshotOptions, SourceChoice, TcpState, netlink};

const IN_NETNS_ENV: &str = "NODETUNE_BENCH_IN_NETNS";
/// Connections per batch: 2 fds each until closed, well below the open-file limit.
const BATCH: usize = 1000;
/// Destination ports to spread the 4-tuples over, so the ephemeral range never runs dry.
const LISTENERS: usize = 8;

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    if std::env::var_os(IN_NETNS_ENV).is_none() {
        return reexec_in_fresh_netns();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sockets = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000usize);
    let rounds = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7usize);
    match bench(sockets, rounds) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_tcpstat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn reexec_in_fresh_netns() -> ExitCode {
    let status = std::env::current_exe().and_then(|exe| {
        Command::new("unshare")
            .arg("--net")
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(IN_NETNS_ENV, "1")
            .status()
    });
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("bench_tcpstat: namespace child failed ({s}); run as root");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench_tcpstat: cannot run unshare: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(sockets: usize, rounds: usize) -> Result<(), BoxError> {
    sh("ip link set lo up")?;
    // Our own namespace: a wide port range, and no reuse of TIME_WAIT ports by new connects.
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "0")?;
    let max_tw: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")?
        .trim()
        .parse()?;
    if sockets > max_tw {
        return Err(format!("{sockets} exceeds tcp_max_tw_buckets {max_tw}").into());
    }

    let started = Instant::now();
    create_time_wait(sockets)?;
    let tw = wait_settled(sockets)?;
    println!(
        "created {tw} TIME_WAIT sockets in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let methods: [(&str, Method); 5] = [
        ("tcpstat netlink", Method::Library(SourceChoice::Netlink)),
        ("  AF_INET dump only", Method::InetDumpOnly),
        ("tcpstat procfs", Method::Library(SourceChoice::Procfs)),
        (
            "ss -tanH | awk",
            Method::Shell("ss -tanH | awk '{++S[$1]} END {for(a in S) print a, S[a]}'"),
        ),
        (
            "netstat -n | awk",
            Method::Shell("netstat -n | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'"),
        ),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    let mut seen: Vec<u64> = vec![0; methods.len()];
    for _ in 0..rounds {
        for (i, (_, method)) in methods.iter().enumerate() {
            let t = Instant::now();
            seen[i] = method.time_wait_count()?;
            times[i].push(t.elapsed());
        }
    }
    let after = wait_settled(0)?;
    if after != tw {
        return Err(format!(
            "TIME_WAIT count changed during measurement ({tw} -> {after}): \
             sockets expired; use fewer sockets or rounds"
        )
        .into());
    }

    println!(
        "elapsed since first socket: {:.1} s (TIME_WAIT lasts 60 s)",
        started.elapsed().as_secs_f64()
    );
    println!("{rounds} rounds, median per method:");
    let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
    let base = medians[0].as_secs_f64().max(f64::EPSILON);
    for (i, (name, _)) in methods.iter().enumerate() {
        println!(
            "  {name:<18} {:>8.1} ms  x{:>5.1}  (TIME_WAIT counted: {})",
            medians[i].as_secs_f64() * 1e3,
            medians[i].as_secs_f64() / base,
            seen[i]
        );
    }
    Ok(())
}

enum Method {
    Library(SourceChoice),
    /// One bare sock_diag dump (no sockstat, no IPv6 walk): the floor for netlink.
    InetDumpOnly,
    Shell(&'static str),
}

impl Method {
    /// Counts once and returns the TIME_WAIT count seen, so every method is checked.
    fn time_wait_count(&self) -> Result<u64, BoxError> {
        match self {
            Method::Library(choice) => {
                let snapshot = tcpstat::snapshot_with(&SnapshotOptions {
                    source: *choice,
                    ..SnapshotOptions::default()
                })?;
                Ok(snapshot.total.get(TcpState::TimeWait))
            }
            Method::InetDumpOnly => {
                Ok(netlink::count_family(netlink::Family::Inet)?.get(TcpState::TimeWait))
            }
            Method::Shell(script) => {
                let out = sh(script)?;
                let count = out
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .find(|(state, _)| matches!(*state, "TIME-WAIT" | "TIME_WAIT"))
                    .map(|(_, n)| n.trim().parse())
                    .transpose()?;
                Ok(count.unwrap_or(0))
            }
        }
    }
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Client-first closes on loopback, `BATCH` connections at a time.
fn create_time_wait(total: usize) -> Result<(), BoxError> {
    let listeners: Vec<TcpListener> = (0..LISTENERS)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<_> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let mut made = 0;
    while made < total {
        let n = BATCH.min(total - made);
        let mut pairs = Vec::with_capacity(n);
        for i in 0..n {
            let which = (made + i) % LISTENERS;
            let client = TcpStream::connect(addrs[which])
                .map_err(|e| format!("connect #{}: {e}", made + i))?;
            let (server, _) = listeners[which].accept()?;
            pairs.push((client, server));
        }
        let mut servers = Vec::with_capacity(n);
        for (client, server) in pairs {
            drop(client); // the client closes first and keeps the TIME_WAIT
            servers.push(server);
        }
        for mut server in servers {
            server.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut byte = [0u8; 1];
            if server.read(&mut byte)? != 0 {
                return Err("expected EOF".into());
            }
        }
        made += n;
    }
    Ok(())
}

/// Waits (bounded) until no socket is still closing, returns the TIME_WAIT count; with
/// `at_least` > 0 also until that many exist.
fn wait_settled(at_least: usize) -> Result<u64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = tcpstat::snapshot_with(&SnapshotOptions {
            source: SourceChoice::Netlink,
            ..SnapshotOptions::default()
        })?;
        let closing: u64 = [TcpState::FinWait1, TcpState::FinWait2, TcpState::LastAck]
            .into_iter()
            .map(|state| s.total.get(state))
            .sum();
        let tw = s.total.get(TcpState::TimeWait);
        if closing == 0 && tw >= at_least as u64 {
            return Ok(tw);
        }
        if Instant::now() > deadline {
            return Err(format!("sockets did not settle: {:?}", s.total).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh(script: &str) -> Result<String, BoxError> {
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    if !out.status.success() {
        return Err(format!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}
