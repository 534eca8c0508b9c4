//! What the benchmarks share: their numeric arguments and the timing of a child process.
//! Included with `mod support;` (a directory without `main.rs` is not an example of its own).
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error>;

/// The `i`th argument as a count (`_` separators allowed), or `default` when absent.
pub fn arg(args: &[String], i: usize, default: usize) -> Result<usize, BoxError> {
    match args.get(i) {
        None => Ok(default),
        Some(a) => Ok(a
            .replace('_', "")
            .parse()
            .map_err(|e| format!("argument {a:?}: {e}"))?),
    }
}

/// Reaps `child` (started at `started`) with `wait4`: the wall time and its peak RSS (KiB).
/// An exit other than 0 is an error naming `what`.
pub fn wait_timed(
    child: &Child,
    started: Instant,
    what: &str,
) -> Result<(Duration, u64), BoxError> {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(child.id())?;
    // SAFETY: reaps our own child; `status` and `usage` are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if rc != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("`{what}` failed (status {status})").into());
    }
    Ok((elapsed, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}
