//! The agent's memory between passes, with glibc's malloc (the image's static binary links it).
//! The agent is idle nearly all the time and its passes allocate in bursts (a `/proc` scan,
//! every pod's counts, the report), so what matters is what it holds while it waits:
//!
//! - glibc gives each thread that allocates an arena of its own (up to 8 per core), and
//!   memory freed in one is not reused by another: one arena for the whole process instead.
//!   The agent's few threads seldom allocate at once, so nothing waits on the shared lock in
//!   practice.
//! - freed memory stays with the process until the top of the heap is free: after each pass,
//!   [`trim`] gives the free pages back (`malloc_trim` also releases the middle of the heap).
//!
//! - the agent's passes run on the thread that calls `block_on`; its watches and /metrics are
//!   I/O-light and need one runtime worker, not tokio's one per core (64 threads, each a stack
//!   and with glibc possibly an arena, on a 64-core node): see [`runtime`].
//!
//! Other C libraries (musl): the malloc settings are no-ops.
#![allow(unsafe_code)]

/// The agent's runtime: one worker, and one malloc arena set before its thread starts.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    one_arena();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// One malloc arena for the process. Call before any other thread starts: arenas made before
/// stay in use.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers; an unknown parameter is refused, never undefined.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the free pages of the heap to the kernel (after a pass: its buffers are freed).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a size and walks malloc's own lists under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agent_runtime_has_one_worker() {
        let runtime = super::runtime().expect("runtime");
        assert_eq!(runtime.metrics().num_workers(), 1);
        // The passes run here, in block_on, beside the worker.
        assert_eq!(runtime.block_on(async { 2 + 2 }), 4);
    }
}
