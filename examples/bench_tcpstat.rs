//! Benchmark: counting TCP sockets per state, `nodetune tcpstat` against the floors and the
//! usual tools, at a given number of ESTABLISHED and TIME_WAIT sockets (IPv4 and IPv6), in a
//! network namespace this program creates.
//!
//! Run as root, from the repository (it runs `target/release/nodetune`, or `$NODETUNE_BIN`):
//!
//! ```sh
//! cargo build --release --bin nodetune --example bench_tcpstat
//! target/release/examples/bench_tcpstat ESTABLISHED TIME_WAIT [ROUNDS]
//! ```
//!
//! or the whole matrix with `scripts/bench-tcpstat`. Every method runs as its own process,
//! once per round, interleaved so that noise hits all alike; the table shows medians, the
//! ratio to `nodetune tcpstat`, each method's peak RSS and the TIME_WAIT count it saw:
//!
//! - `nodetune tcpstat -o json` (one kernel walk, sockstat, JSON),
//! - the same with `--source netlink-per-family` (the fallback: one walk per family),
//! - a bare two-family `SOCK_DIAG_BY_FAMILY` loop that only counts state bytes (what any
//!   straightforward implementation does: the naive floor),
//! - a bare single-walk `TCPDIAG_GETSOCK` loop (the floor for nodetune's way),
//! - `ss -tanH | awk` and the classic `netstat -n | awk`.
//!
//! Then, in-process (no process start-up): the library's count, the bare single walk, and
//! the cheap tier, reading `/proc/net/sockstat{,6}`.
//!
//! How the sockets are made without hitting the open-file limit (~20,000 per process, hard):
//! ESTABLISHED pairs come from worker processes (this program re-executed with `--worker`)
//! that each hold up to 19,000 client sockets connected to listeners of the main process with
//! a huge backlog and never accepted, so the server ends sit in accept queues without any
//! file descriptor. TIME_WAIT sockets need no descriptor at all: two workers connect, close
//! client-first and move on. TIME_WAIT lasts 60 s (a kernel constant), so they are made last
//! and the program reports whether any expired while measuring. Everything lives in the
//! namespace and dies with it; the sysctls set are that namespace's own.
//!
//! `bench_tcpstat --hold ESTABLISHED TIME_WAIT` only makes the sockets, in the namespace it is
//! started in (`bench_agent` runs it in a node's), and holds them until standard input closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nodetune::tcpstat::{TcpState, netlink, sockstat};

mod support;
use support::{BoxError, arg};

const IN_NETNS_ENV: &str = "NODETUNE_BENCH_IN_NETNS";
/// Client sockets per ESTABLISHED worker: below the 20,000 open-file hard limit.
const PER_WORKER: usize = 19_000;
/// IPv4 and IPv6 listen addresses on loopback (each with several ports).
const V4_ADDRS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 0, 0, 4),
];
const V6_ADDRS: [Ipv6Addr; 4] = [
    Ipv6Addr::LOCALHOST,
    Ipv6Addr::new(0xfd00, 0x6e74, 0, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x6e74, 0, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0xfd00, 0x6e74, 0, 0, 0, 0, 0, 4),
];
/// Ports per address: spreads 4-tuples so no destination runs out of ephemeral ports.
const PORTS_PER_ADDR: usize = 8;
/// Parallel TIME_WAIT makers (the machine has 2 cores).
const TW_WORKERS: usize = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--worker") => worker(&args[1..]),
        Some("--bare") => bare(&args[1..]),
        Some("--hold") => hold(&args[1..]),
        _ if std::env::var_os(IN_NETNS_ENV).is_none() => return reexec_in_fresh_netns(),
        _ => bench(&args),
    };
    match result {
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

fn bench(args: &[String]) -> Result<(), BoxError> {
    let established = arg(args, 0, 10_000)?;
    let time_wait = arg(args, 1, 90_000)?;
    let rounds = arg(args, 2, 5)?.max(1);
    let nodetune =
        std::env::var("NODETUNE_BIN").unwrap_or_else(|_| "target/release/nodetune".into());
    if !std::path::Path::new(&nodetune).exists() {
        return Err(format!("{nodetune} not found: cargo build --release --bin nodetune").into());
    }
    let (
        listeners,
        Sockets {
            holders,
            tw_workers,
            est_secs,
            tw_secs,
            tw_started,
        },
        before,
    ) = load(established, time_wait)?;
    let tw_before = both(&before, TcpState::TimeWait);
    println!(
        "sockets: {} (ESTABLISHED {}, TIME_WAIT {tw_before}, IPv4 {}, IPv6 {}); made in {est_secs:.1} s + {tw_secs:.1} s",
        before.ipv4.total() + before.ipv6.total(),
        both(&before, TcpState::Established),
        before.ipv4.total(),
        before.ipv6.total(),
    );

    let me = std::env::current_exe()?;
    let me = me.to_string_lossy();
    let methods: Vec<(&str, String)> = vec![
        ("nodetune tcpstat", format!("{nodetune} tcpstat -o json")),
        (
            "nodetune tcpstat, per-family",
            format!("{nodetune} tcpstat -o json --source netlink-per-family"),
        ),
        ("bare two-family loop", format!("{me} --bare two-family")),
        ("bare single-walk loop", format!("{me} --bare single-walk")),
        (
            "ss -tanH | awk",
            "ss -tanH | awk '{++S[$1]} END {for(a in S) print a, S[a]}'".into(),
        ),
        (
            "netstat -n | awk",
            "netstat -n | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'".into(),
        ),
    ];
    let mut times = vec![Vec::new(); methods.len()];
    let mut rss = vec![0u64; methods.len()];
    let mut seen = vec![0u64; methods.len()];
    for _ in 0..rounds {
        for (i, (_, script)) in methods.iter().enumerate() {
            let run = run_timed(script)?;
            times[i].push(run.elapsed);
            rss[i] = rss[i].max(run.max_rss_kib);
            seen[i] = time_wait_in(&run.stdout)?;
        }
    }

    // In-process: the library, the bare walk, and the cheap tier.
    let mut lib = Vec::new();
    let mut lib_per_family = Vec::new();
    let mut bare_one = Vec::new();
    let mut cheap = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let (counts, walk) = netlink::count()?;
        lib.push(t.elapsed());
        if walk != netlink::Walk::Single {
            return Err("the kernel refused the one-walk request".into());
        }
        std::hint::black_box(counts);
        let t = Instant::now();
        std::hint::black_box(netlink::count_per_family()?);
        lib_per_family.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(bare_count(Bare::SingleWalk)?);
        bare_one.push(t.elapsed());
        let t = Instant::now();
        for _ in 0..100 {
            std::hint::black_box(sockstat::read_sockstat(std::path::Path::new("/proc"))?);
        }
        cheap.push(t.elapsed() / 100);
    }
    let after = settle()?;
    let tw_after = after.ipv4.get(TcpState::TimeWait) + after.ipv6.get(TcpState::TimeWait);

    let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
    let base = medians[0].as_secs_f64().max(f64::EPSILON);
    let total = (before.ipv4.total() + before.ipv6.total()) as f64;
    println!("{rounds} rounds, each method a process (median, ratio to nodetune tcpstat):");
    println!(
        "| method | median | ratio | per 100k sockets | peak RSS | TIME_WAIT seen |\n|---|---|---|---|---|---|"
    );
    for (i, (name, _)) in methods.iter().enumerate() {
        let ms = medians[i].as_secs_f64() * 1e3;
        println!(
            "| {name} | {ms:.1} ms | ×{:.2} | {:.1} ms | {:.1} MiB | {} |",
            medians[i].as_secs_f64() / base,
            ms * 1e5 / total.max(1.0),
            rss[i] as f64 / 1024.0,
            seen[i]
        );
    }
    let lib = median(&mut lib).as_secs_f64() * 1e3;
    let lib_pf = median(&mut lib_per_family).as_secs_f64() * 1e3;
    let bare_one = median(&mut bare_one).as_secs_f64() * 1e3;
    let cheap = median(&mut cheap).as_secs_f64() * 1e6;
    println!("in-process (median):");
    println!(
        "  netlink::count (one walk)    {lib:8.2} ms  ×{:.2} of the bare single walk; {:.2} ms per 100k sockets",
        lib / bare_one.max(f64::EPSILON),
        lib * 1e5 / total.max(1.0)
    );
    println!("  netlink::count_per_family    {lib_pf:8.2} ms");
    println!("  bare single walk             {bare_one:8.2} ms");
    println!(
        "  read_sockstat (cheap tier)   {cheap:8.1} µs  (sockstat + sockstat6 + 2 sysctls; independent of the socket count)"
    );
    if tw_after == tw_before {
        println!(
            "TIME_WAIT unchanged while measuring ({tw_before}); elapsed {:.1} s",
            tw_started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "WARNING: TIME_WAIT changed while measuring ({tw_before} -> {tw_after}): sockets expired after 60 s; counts differ between methods"
        );
    }
    for (i, (name, _)) in methods.iter().enumerate() {
        if tw_after == tw_before && seen[i] != tw_before {
            return Err(
                format!("{name} counted {} TIME_WAIT, expected {tw_before}", seen[i]).into(),
            );
        }
    }
    drop(holders);
    drop(tw_workers);
    drop(listeners);
    Ok(())
}

/// The workers holding the sockets, how long each kind took, and when the TIME_WAIT ones were
/// started (they expire 60 s later).
struct Sockets {
    holders: Vec<Worker>,
    tw_workers: Vec<Worker>,
    est_secs: f64,
    tw_secs: f64,
    tw_started: Instant,
}

/// ESTABLISHED holders first, then the TIME_WAIT makers (TIME_WAIT expires after 60 s).
fn make_sockets(
    established: usize,
    time_wait: usize,
    listeners: &Listeners,
) -> Result<Sockets, BoxError> {
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut left = established / 2; // connections: two ESTABLISHED sockets each
    let mut offset = 0;
    while left > 0 {
        let n = left.min(PER_WORKER);
        holders.push(Worker::spawn_established(n, offset, &listeners.addrs)?);
        left -= n;
        offset += n;
    }
    for holder in &mut holders {
        holder.wait_ready()?;
    }
    let est_secs = started.elapsed().as_secs_f64();
    let tw_started = Instant::now();
    let mut tw_workers = Vec::new();
    for i in 0..TW_WORKERS {
        let n = time_wait / TW_WORKERS + usize::from(i < time_wait % TW_WORKERS);
        if n > 0 {
            tw_workers.push(Worker::spawn_time_wait(n, i)?);
        }
    }
    for w in &mut tw_workers {
        w.wait_ready()?;
    }
    Ok(Sockets {
        holders,
        tw_workers,
        est_secs,
        tw_secs: tw_started.elapsed().as_secs_f64(),
        tw_started,
    })
}

/// `--hold ESTABLISHED TIME_WAIT`: makes the sockets in the current network namespace (a
/// node's, for `bench_agent`), prints `ready` with the counts, and holds them until standard
/// input closes.
fn hold(args: &[String]) -> Result<(), BoxError> {
    let established = arg(args, 0, 10_000)?;
    let time_wait = arg(args, 1, 0)?;
    let (listeners, sockets, c) = load(established, time_wait)?;
    println!(
        "ready {} {} {} {:.1} {:.1}",
        c.ipv4.total() + c.ipv6.total(),
        both(&c, TcpState::Established),
        both(&c, TcpState::TimeWait),
        sockets.est_secs,
        sockets.tw_secs,
    );
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(sockets.tw_workers);
    drop(sockets.holders);
    drop(listeners);
    Ok(())
}

/// What `bench` and `hold` start from: this namespace set up, the sockets made, and their
/// count once settled.
fn load(
    established: usize,
    time_wait: usize,
) -> Result<(Listeners, Sockets, netlink::FamilyCounts), BoxError> {
    setup_namespace(established + time_wait)?;
    let listeners = Listeners::bind()?;
    let sockets = make_sockets(established, time_wait, &listeners)?;
    let counts = settle()?;
    Ok((listeners, sockets, counts))
}

/// Sockets in `state`, IPv4 and IPv6 together.
fn both(c: &netlink::FamilyCounts, state: TcpState) -> u64 {
    c.ipv4.get(state) + c.ipv6.get(state)
}

/// Our namespace only: loopback up with extra IPv6 addresses, a wide port range, no reuse of
/// TIME_WAIT ports, and room for the sockets asked for.
fn setup_namespace(sockets: usize) -> Result<(), BoxError> {
    sh("ip link set lo up")?;
    for addr in &V6_ADDRS[1..] {
        sh(&format!("ip -6 addr add {addr}/128 dev lo nodad"))?;
    }
    let set = |key: &str, value: String| -> Result<(), BoxError> {
        std::fs::write(format!("/proc/sys/{key}"), &value)
            .map_err(|e| format!("setting {key} = {value} in the bench namespace: {e}"))?;
        Ok(())
    };
    set("net/ipv4/ip_local_port_range", "1024 65535".into())?;
    set("net/ipv4/tcp_tw_reuse", "0".into())?;
    set("net/ipv4/tcp_max_tw_buckets", (sockets + 1000).to_string())?;
    set("net/core/somaxconn", (sockets + 1000).to_string())?;
    set("net/ipv4/tcp_max_syn_backlog", (sockets + 1000).to_string())?;
    Ok(())
}

fn listen_addrs(ports: usize) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for _ in 0..ports {
        out.extend(V4_ADDRS.iter().map(|a| SocketAddr::new(IpAddr::V4(*a), 0)));
        out.extend(V6_ADDRS.iter().map(|a| SocketAddr::new(IpAddr::V6(*a), 0)));
    }
    out
}

/// Listeners of the ESTABLISHED connections, never accepting: the server ends wait in the
/// accept queues, which need no descriptor.
struct Listeners {
    _sockets: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
}

impl Listeners {
    fn bind() -> Result<Self, BoxError> {
        let sockets: Vec<TcpListener> = listen_addrs(PORTS_PER_ADDR)
            .into_iter()
            .map(TcpListener::bind)
            .collect::<Result<_, _>>()?;
        for s in &sockets {
            // listen() again on a listening socket only raises its backlog (capped by
            // net.core.somaxconn, raised in our namespace).
            // SAFETY: a valid listening descriptor owned by `s`.
            if unsafe { libc::listen(s.as_raw_fd(), i32::MAX) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let addrs = sockets
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            _sockets: sockets,
            addrs,
        })
    }
}

/// A child process holding or making sockets; killed (and reaped) on drop.
struct Worker {
    child: Child,
}

impl Worker {
    fn spawn_established(n: usize, offset: usize, addrs: &[SocketAddr]) -> Result<Self, BoxError> {
        let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        Self::spawn(&[
            "established".into(),
            n.to_string(),
            offset.to_string(),
            list.join(","),
        ])
    }

    fn spawn_time_wait(n: usize, index: usize) -> Result<Self, BoxError> {
        Self::spawn(&["time-wait".into(), n.to_string(), index.to_string()])
    }

    fn spawn(args: &[String]) -> Result<Self, BoxError> {
        let child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        Ok(Self { child })
    }

    /// Waits for the worker's `ready` line.
    fn wait_ready(&mut self) -> Result<(), BoxError> {
        let out = self.child.stdout.as_mut().ok_or("worker stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(format!("worker failed (said {line:?})").into());
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raise_nofile() -> Result<(), BoxError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// `--worker established N OFFSET ADDRS` or `--worker time-wait N INDEX`: prints `ready` when
/// its sockets exist; an ESTABLISHED holder then waits for stdin to close.
fn worker(args: &[String]) -> Result<(), BoxError> {
    // Die with the benchmark, however it ends, so no socket outlives it.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    raise_nofile()?;
    let n = arg(args, 1, 0)?;
    let offset = arg(args, 2, 0)?;
    match args.first().map(String::as_str) {
        Some("established") => {
            let addrs: Vec<SocketAddr> = args
                .get(3)
                .ok_or("addresses")?
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                let to = addrs[(offset + i) % addrs.len()];
                held.push(TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?);
            }
            println!("ready");
            std::io::stdout().flush()?;
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(held);
        }
        Some("time-wait") => {
            let listeners: Vec<TcpListener> = listen_addrs(PORTS_PER_ADDR)
                .into_iter()
                .map(TcpListener::bind)
                .collect::<Result<_, _>>()?;
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(TcpListener::local_addr)
                .collect::<Result<_, _>>()?;
            const BATCH: usize = 64;
            let mut made = 0;
            let mut round = offset;
            while made < n {
                let b = BATCH.min(n - made);
                let which = round % listeners.len();
                round += 1;
                let mut pairs = Vec::with_capacity(b);
                for _ in 0..b {
                    let client = TcpStream::connect(addrs[which])?;
                    let (server, _) = listeners[which].accept()?;
                    pairs.push((client, server));
                }
                let mut servers = Vec::with_capacity(b);
                for (client, server) in pairs {
                    drop(client); // the client closes first and keeps the TIME_WAIT
                    servers.push(server);
                }
                for mut server in servers {
                    let mut byte = [0u8; 1];
                    server.set_read_timeout(Some(Duration::from_secs(10)))?;
                    if server.read(&mut byte)? != 0 {
                        return Err("expected EOF".into());
                    }
                }
                made += b;
            }
            println!("ready");
            std::io::stdout().flush()?;
        }
        other => return Err(format!("unknown worker {other:?}").into()),
    }
    Ok(())
}

/// Counts the namespace until no socket is mid-close; returns the counts.
fn settle() -> Result<netlink::FamilyCounts, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, _) = netlink::count()?;
        let closing: u64 = [TcpState::FinWait1, TcpState::FinWait2, TcpState::LastAck]
            .into_iter()
            .map(|s| c.ipv4.get(s) + c.ipv6.get(s))
            .sum();
        if closing == 0 || Instant::now() > deadline {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Run {
    elapsed: Duration,
    max_rss_kib: u64,
    stdout: String,
}

/// Runs a shell command, timing it and reading its peak RSS from `wait4`.
fn run_timed(script: &str) -> Result<Run, BoxError> {
    let t = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {script}"))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .ok_or("stdout")?
        .read_to_string(&mut stdout)?;
    let (elapsed, max_rss_kib) = support::wait_timed(&child, t, script)?;
    Ok(Run {
        elapsed,
        max_rss_kib,
        stdout,
    })
}

/// The TIME_WAIT count in any method's output: nodetune's JSON or `STATE COUNT` lines.
fn time_wait_in(out: &str) -> Result<u64, BoxError> {
    if out.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(out)?;
        return v["total"]["TIME_WAIT"]
            .as_u64()
            .ok_or_else(|| "no total.TIME_WAIT in JSON".into());
    }
    let count = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(state, _)| matches!(*state, "TIME-WAIT" | "TIME_WAIT"))
        .map(|(_, n)| n.trim().parse())
        .transpose()?;
    Ok(count.unwrap_or(0))
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
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

// ---------------------------------------------------------------------------------------------
// The bare loops: the least code that counts states, with no checks beyond not reading out
// of bounds. Floors to compare against, not examples to follow.

#[derive(Clone, Copy)]
enum Bare {
    TwoFamily,
    SingleWalk,
}

/// `--bare two-family|single-walk`: prints `TIME_WAIT n`.
fn bare(args: &[String]) -> Result<(), BoxError> {
    let which = match args.first().map(String::as_str) {
        Some("two-family") => Bare::TwoFamily,
        Some("single-walk") => Bare::SingleWalk,
        other => return Err(format!("unknown bare loop {other:?}").into()),
    };
    let states = bare_count(which)?;
    println!("TIME_WAIT {}", states[6]);
    Ok(())
}

/// Per kernel state number, both families together.
fn bare_count(which: Bare) -> Result<[u64; 16], BoxError> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut states = [0u64; 16];
    let mut buf = vec![0u8; 32 * 1024];
    let requests: &[(u16, u8)] = match which {
        Bare::TwoFamily => &[(20, libc::AF_INET as u8), (20, libc::AF_INET6 as u8)],
        Bare::SingleWalk => &[(18, libc::AF_UNSPEC as u8)],
    };
    for &(kind, family) in requests {
        let mut req = [0u8; 76];
        let len: usize = if kind == 18 { 76 } else { 72 };
        req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&kind.to_ne_bytes());
        req[6..8].copy_from_slice(&0x301u16.to_ne_bytes());
        req[16] = family;
        if kind == 18 {
            req[68..72].copy_from_slice(&0x1ffeu32.to_ne_bytes());
        } else {
            req[17] = 6;
            req[20..24].copy_from_slice(&0x1ffeu32.to_ne_bytes());
        }
        // SAFETY: `req` is valid for `len` bytes; a null address sends to the kernel.
        if unsafe { libc::send(fd, req.as_ptr().cast(), len, 0) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        'dump: loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into()?) as usize;
                let typ = u16::from_ne_bytes(buf[off + 4..off + 6].try_into()?);
                if typ == 3 || typ == 2 || len < 16 {
                    break 'dump;
                }
                if let Some(state) = buf.get(off + 17) {
                    states[usize::from(*state & 15)] += 1;
                }
                off += (len + 3) & !3;
            }
        }
    }
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(fd) };
    Ok(states)
}
