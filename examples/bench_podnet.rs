//! Benchmark: counting TCP sockets in many pod network namespaces, nodetune's way (the one-walk
//! `sock_diag` count from inside each namespace, and the sockstat tier) against reading
//! `/proc/<pid>/net/tcp{,6}` per namespace as cAdvisor does and against `nsenter -n ss -tan`
//! per namespace. Plain `unshare -n` processes stand in for pods.
//!
//! Run as root, from the repository (it starts `examples/bench_tcpstat --hold` from the same
//! target directory to make and hold the sockets):
//!
//! ```sh
//! cargo build --example bench_podnet --example bench_tcpstat
//! target/debug/examples/bench_podnet PODS PER_POD HOST [ROUNDS] [CHILD_EHASH]
//! ```
//!
//! or `scripts/bench-podnet`. Everything happens in a network namespace this program creates
//! (the stand-in host): HOST ESTABLISHED sockets there, PODS child namespaces of PER_POD
//! ESTABLISHED sockets each (only ESTABLISHED: they last, so every round counts the same
//! sockets; the per-socket cost of a state does not depend on the state). CHILD_EHASH, when not
//! 0, sets `net.ipv4.tcp_child_ehash_entries` in the stand-in host before the pods are made, so
//! each pod namespace gets a TCP hash table of its own. Each method runs ROUNDS times,
//! interleaved; the table shows medians and the sockets each method counted.
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nodetune::podnet::{self, Limits, NsRef, count};
use nodetune::tcpstat::{netlink, procfs};

mod support;
use support::{BoxError, arg};

const IN_NETNS_ENV: &str = "NODETUNE_BENCH_PODNET_IN_NETNS";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if std::env::var_os(IN_NETNS_ENV).is_none() {
        reexec_in_fresh_netns(&args)
    } else {
        bench(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_podnet: {e}");
            ExitCode::FAILURE
        }
    }
}

fn reexec_in_fresh_netns(args: &[String]) -> Result<(), BoxError> {
    let status = Command::new("unshare")
        .arg("--net")
        .arg(std::env::current_exe()?)
        .args(args)
        .env(IN_NETNS_ENV, "1")
        .status()?;
    if !status.success() {
        return Err(format!("namespace child failed ({status}); run as root").into());
    }
    Ok(())
}

/// A `bench_tcpstat --hold` process holding sockets in its namespace; ends when dropped.
struct Holder(Child);

impl Holder {
    fn start(prefix: &[&str], established: usize) -> Result<Self, BoxError> {
        let exe = std::env::current_exe()?;
        let holder = exe.with_file_name("bench_tcpstat");
        let mut child = Command::new(prefix.first().copied().unwrap_or("env"))
            .args(prefix.iter().skip(1))
            .arg(&holder)
            .args(["--hold", &established.to_string(), "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", holder.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            return Err(format!("holder said {line:?}").into());
        }
        Ok(Self(child))
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap_or_default()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing stdin ends the holder; kill in case it is stuck.
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod stand-in. A fresh namespace's first IPv6 connect now and then finds no route to an
/// address just added to `lo` (seen about once in 50 namespaces here): such a pod is made again.
fn start_pod(per_pod: usize) -> Result<Holder, BoxError> {
    let mut last = None;
    for _ in 0..3 {
        match Holder::start(&["unshare", "-n"], per_pod) {
            Ok(h) => return Ok(h),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| "no attempt".into()))
}

/// The pod stand-ins, each in a fake pod cgroup of the v1 `name=systemd` hierarchy; on drop the
/// stand-ins end first, then their emptied cgroups are removed.
struct PodCgroups {
    holders: Vec<Holder>,
    dirs: Vec<std::path::PathBuf>,
}

impl PodCgroups {
    fn new(holders: Vec<Holder>) -> Result<Self, BoxError> {
        let top =
            Path::new("/sys/fs/cgroup/systemd").join(format!("ntbench-{}", std::process::id()));
        // Built first, so that a failure half-way still cleans up on drop.
        let mut this = Self {
            holders,
            dirs: Vec::new(),
        };
        let pids: Vec<i32> = this.holders.iter().map(Holder::pid).collect();
        for (i, pid) in pids.into_iter().enumerate() {
            let dir = top.join(format!(
                "kubepods/besteffort/pod{:08x}-0000-4000-8000-{i:012x}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir)?;
            this.dirs.push(dir.clone());
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(this)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        self.holders.clear();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
        if let Some(top) = self.dirs.first().and_then(|d| d.ancestors().nth(3)) {
            let _ = std::fs::remove_dir(top.join("kubepods/besteffort"));
            let _ = std::fs::remove_dir(top.join("kubepods"));
            let _ = std::fs::remove_dir(top);
        }
    }
}

fn target_of(pid: i32) -> Result<NsRef, BoxError> {
    let root = Path::new("/proc");
    Ok(NsRef {
        ns: podnet::procs::ns_of(&root.join(pid.to_string()).join("ns/net"))?,
        pid,
        start_time: podnet::procs::start_time_of(root, pid).ok_or("pod gone")?,
    })
}

/// Sockets counted by each method, and its times.
struct Method {
    name: &'static str,
    times: Vec<Duration>,
    sockets: u64,
}

fn full_count(targets: &[NsRef]) -> Result<u64, BoxError> {
    let limits = Limits {
        max_namespaces: usize::MAX,
        budget: Duration::from_secs(3600),
        ..Limits::default()
    };
    let far = Instant::now() + limits.budget;
    let pass = count::walk_all(Path::new("/proc"), targets, &limits, far)?;
    let mut n = 0;
    for (_, r) in pass.results {
        let w = r?;
        n += (w.counts.ipv4 + w.counts.ipv6).total();
    }
    Ok(n)
}

fn procfs_count(targets: &[NsRef]) -> Result<u64, BoxError> {
    let mut n = 0;
    for t in targets {
        let (v4, v6) = procfs::count(&Path::new("/proc").join(t.pid.to_string()))?;
        n += (v4 + v6).total();
    }
    Ok(n)
}

fn ss_count(targets: &[NsRef]) -> Result<u64, BoxError> {
    let mut n = 0u64;
    for t in targets {
        let out = Command::new("nsenter")
            .args(["-t", &t.pid.to_string(), "-n", "ss", "-tanH"])
            .output()?;
        n += out.stdout.iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(n)
}

fn sockstat_count(targets: &[NsRef]) -> Result<u64, BoxError> {
    let far = Instant::now() + Duration::from_secs(3600);
    let limits = Limits {
        max_namespaces: usize::MAX,
        ..Limits::default()
    };
    let pass = count::sockstat_all(Path::new("/proc"), targets, &limits, far);
    let mut n = 0;
    for (_, r) in pass.results {
        let s = r?;
        n += s.inuse + s.tw;
    }
    Ok(n)
}

fn host_walk(_: &[NsRef]) -> Result<u64, BoxError> {
    let (c, _) = netlink::count()?;
    Ok((c.ipv4 + c.ipv6).total())
}

type Count = fn(&[NsRef]) -> Result<u64, BoxError>;

fn measure(targets: &[NsRef], rounds: usize) -> Result<Vec<Method>, BoxError> {
    let methods: [(&'static str, Count); 5] = [
        ("nodetune full count (walk per pod namespace)", full_count),
        ("/proc/<pid>/net/tcp{,6} per namespace", procfs_count),
        ("nsenter -n ss -tanH per namespace", ss_count),
        ("nodetune sockstat tier (no walk)", sockstat_count),
        ("one walk of the stand-in host namespace", host_walk),
    ];
    let mut out: Vec<Method> = methods
        .iter()
        .map(|(name, _)| Method {
            name,
            times: Vec::new(),
            sockets: 0,
        })
        .collect();
    for _ in 0..rounds {
        for (i, (_, f)) in methods.iter().enumerate() {
            let t = Instant::now();
            out[i].sockets = f(targets)?;
            out[i].times.push(t.elapsed());
        }
    }
    Ok(out)
}

/// This process's peak resident set (`VmHWM`).
fn peak_rss_kib() -> Result<u64, BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).ok_or("VmHWM")?.parse()?)
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

fn bench(args: &[String]) -> Result<(), BoxError> {
    let pods = arg(args, 0, 100)?;
    let per_pod = arg(args, 1, 1_000)?;
    let host = arg(args, 2, 100_000)?;
    let rounds = arg(args, 3, 5)?;
    let child_ehash = arg(args, 4, 0)?;
    std::fs::write(
        "/proc/sys/net/ipv4/tcp_child_ehash_entries",
        child_ehash.to_string(),
    )
    .map_err(|e| format!("setting tcp_child_ehash_entries: {e}"))?;
    let started = Instant::now();
    let _host = (host > 0).then(|| Holder::start(&[], host)).transpose()?;
    let mut holders = Vec::with_capacity(pods);
    for _ in 0..pods {
        holders.push(start_pod(per_pod)?);
    }
    eprintln!("sockets made in {:.1} s", started.elapsed().as_secs_f64());
    // Each stand-in in a cgroup named as the kubelet names a pod's, so the agent's discovery
    // finds it; the cgroups go once the stand-ins are gone.
    let pods_held = PodCgroups::new(holders)?;
    let holders = &pods_held.holders;
    let rss_before = peak_rss_kib()?;
    let targets: Vec<NsRef> = holders
        .iter()
        .map(|h| target_of(h.pid()))
        .collect::<Result<_, _>>()?;
    // The agent's own pass first: discovery of the whole /proc, then the walk, as the agent
    // does it; the peak RSS it adds to this process is what pod counting adds to an agent.
    let mut counter = podnet::PodCounter::new(
        "/proc".into(),
        Limits {
            max_namespaces: usize::MAX,
            budget: Duration::from_secs(3600),
            ..Limits::default()
        },
        Duration::from_secs(3600),
    );
    let t = Instant::now();
    let pass = counter.count()?;
    let first = t.elapsed();
    let t = Instant::now();
    counter.count()?;
    eprintln!(
        "agent pass: {} pod namespaces found; discovery + walk {:.1} ms, discovery + sockstat {:.1} ms; peak RSS {} KiB before, {} KiB after",
        pass.pods.len(),
        first.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3,
        rss_before,
        peak_rss_kib()?
    );
    let mut methods = measure(&targets, rounds)?;
    let base = median(&mut methods[0].times.clone());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{pods} pod namespaces x {per_pod} sockets, {host} host sockets, tcp_child_ehash_entries={child_ehash}, {rounds} rounds"
    )?;
    for m in &mut methods {
        let t = median(&mut m.times);
        writeln!(
            out,
            "{:<46} {:>10.2} ms {:>7.2}x {:>9} sockets",
            m.name,
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / base.as_secs_f64().max(1e-9),
            m.sockets
        )?;
    }
    Ok(())
}
