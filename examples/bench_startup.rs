//! Benchmark: size, start-up time and peak RSS of `nodetune` binaries, compared in one run.
//!
//! `cargo run --example bench_startup -- [ROUNDS] BINARY...` (or `scripts/bench-binary`, which
//! builds the release binary with the default and with the project's `[profile.release]`).
//! Runs `BINARY --help` and `BINARY tcpstat -o json` ROUNDS times each (default 200),
//! interleaving the binaries so that noise hits all alike, and prints size, median and p90
//! wall time and peak RSS. Run it in an empty network namespace (`unshare --net`), so
//! `tcpstat` counts nothing and the figures are start-up, not counting.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::BoxError;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_startup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.first().and_then(|a| a.parse::<usize>().ok()) {
        Some(n) => {
            args.remove(0);
            n.max(1)
        }
        None => 200,
    };
    if args.is_empty() {
        return Err("usage: bench_startup [ROUNDS] BINARY...".into());
    }
    let commands: [&[&str]; 2] = [&["--help"], &["tcpstat", "-o", "json"]];
    // times[binary][command]
    let mut times = vec![vec![Vec::new(); commands.len()]; args.len()];
    let mut rss = vec![vec![0u64; commands.len()]; args.len()];
    for _ in 0..rounds {
        for (b, binary) in args.iter().enumerate() {
            for (c, command) in commands.iter().enumerate() {
                let (elapsed, max_rss) = run_once(binary, command)?;
                times[b][c].push(elapsed);
                rss[b][c] = rss[b][c].max(max_rss);
            }
        }
    }
    println!("{rounds} rounds each, interleaved");
    println!(
        "| binary | size | `--help` median / p90 | `tcpstat -o json` median / p90 | peak RSS (tcpstat) |"
    );
    println!("|---|---|---|---|---|");
    for (b, binary) in args.iter().enumerate() {
        let size = std::fs::metadata(binary)?.len();
        let mut cells = Vec::new();
        for t in &mut times[b] {
            t.sort();
            let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
            cells.push(format!("{:.2} / {:.2} ms", at(0.5), at(0.9)));
        }
        println!(
            "| {binary} | {:.1} MiB ({size} B) | {} | {} | {:.1} MiB |",
            size as f64 / (1024.0 * 1024.0),
            cells[0],
            cells[1],
            rss[b][1] as f64 / 1024.0
        );
    }
    Ok(())
}

/// Runs `binary args` to completion; returns wall time and peak RSS (KiB) from `wait4`.
fn run_once(binary: &str, args: &[&str]) -> Result<(Duration, u64), BoxError> {
    let t = Instant::now();
    let child = Command::new(binary)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    support::wait_timed(&child, t, &format!("{binary} {}", args.join(" ")))
}
